//! Pushing an image through the distribution upload API, as `docker push` does minus
//! the chunking: a `pull,push` token, each blob by `POST` then one monolithic `PUT`
//! to the upload `Location`, the platform manifests by digest, the index at its tag.
//! Each request is a new, never-closed connection of a [`LeakyClient`].

use http::{header, Method, Request, StatusCode};
use http_body_util::Full;

use super::flow::{
    authorize, challenge, check_digest, encode, expect, fetch_token, header_str, io, protocol,
    request, resolve, FlowError,
};
use super::Image;
use crate::testkit::leaky::LeakyClient;

/// Pushes `image` as `repository:tag` through the upload API: a token for
/// `pull,push`, each blob by `POST` then monolithic `PUT` to the upload `Location`,
/// each platform manifest by digest, then the index at `tag`. Returns the requests made.
pub async fn push_image(
    client: &mut LeakyClient,
    registry_base_url: &str,
    repository: &str,
    tag: &str,
    image: &Image,
) -> Result<usize, FlowError> {
    let base = registry_base_url.trim_end_matches('/');
    let mut requests = 0;
    let (_, parsed) = challenge(client, base, &mut requests).await?;
    let scope = format!("repository:{repository}:pull,push");
    let token = fetch_token(client, &parsed.realm, parsed.service.as_deref(), &scope).await?;
    requests += 1;
    for blob in &image.blobs {
        let step = "upload start";
        let mut req = request(
            Method::POST,
            &format!("{base}/v2/{repository}/blobs/uploads/"),
        );
        authorize(&mut req, &token);
        let resp = client.send(req).await.map_err(io(step))?;
        requests += 1;
        let resp = expect(step, resp, StatusCode::ACCEPTED)?;
        let location = header_str(&resp, header::LOCATION)
            .ok_or_else(|| protocol(step, "no upload Location"))?;
        let mut url = resolve(base, &location);
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={}", encode(&blob.digest)));

        let step = "upload";
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(blob.bytes.clone()))
            .map_err(|e| protocol(step, e.to_string()))?;
        authorize(&mut req, &token);
        let resp = client.send(req).await.map_err(io(step))?;
        requests += 1;
        expect(step, resp, StatusCode::CREATED)?;
    }
    let manifests = image
        .manifests
        .iter()
        .map(|m| (m, m.digest.as_str()))
        .chain([(&image.index, tag)]);
    for (manifest, reference) in manifests {
        let step = "manifest push";
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{base}/v2/{repository}/manifests/{reference}"))
            .header(header::CONTENT_TYPE, manifest.media_type)
            .body(Full::new(manifest.bytes.clone()))
            .map_err(|e| protocol(step, e.to_string()))?;
        authorize(&mut req, &token);
        let resp = client.send(req).await.map_err(io(step))?;
        requests += 1;
        let resp = expect(step, resp, StatusCode::CREATED)?;
        check_digest(step, &resp, &manifest.digest)?;
    }
    Ok(requests)
}
