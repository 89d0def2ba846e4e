-- wrk script of benches/registry.sh: a container registry's request mix.
--
-- Each thread cycles through a 20-slot pattern: 6 token (/token, ~1 KiB), 6 manifest
-- (~4 KiB), 7 blobs of 1 MiB and 1 of 16 MiB, i.e. 30 / 30 / 35 / 5 % of requests.
-- The threads start at different slots. With pipeline depth 1, wrk calls request()
-- right before it writes each request, so the mix holds per request, whichever of
-- the thread's connections is free.
--
-- There is deliberately no response() here: defining it makes wrk copy every body
-- into a Lua string, which halved the throughput through the proxies on this bench.
-- The per-class latency comes from regload.py, which runs the same pattern.

local PATHS = {
    T = "/token",
    M = "/v2/lib/manifests/latest",
    B = "/v2/lib/blobs/1m",
    X = "/v2/lib/blobs/16m",
}
local PATTERN = {}

local nthreads = 0
function setup(thread)
    thread:set("tid", nthreads)
    nthreads = nthreads + 1
end

local n = 0
function init(args)
    -- Built here, not at load: wrk.init sets the Host header before it calls init().
    for c in ("TMBTMBTMBXTMBTMBTMBB"):gmatch(".") do
        PATTERN[#PATTERN + 1] = wrk.format("GET", PATHS[c])
    end
    n = (tid or 0) * 7
end

function request()
    n = n + 1
    return PATTERN[n % #PATTERN + 1]
end
