-- wrk script: `GET /api/v1/nodes/assets` as the node agent sends it, authenticated with the node
-- token in TASKFLY_NODE_TOKEN. Used by scripts/bench-bundle.sh against the engine
-- (`load --serve-one-node --bundle-mb 64`); the static file server is asked for the same file
-- by path, without this script.
--
--   TASKFLY_NODE_TOKEN=<token> wrk -t2 -c32 -d10s -s benches/wrk/assets.lua http://127.0.0.1:<port>

local token = os.getenv("TASKFLY_NODE_TOKEN")
if token == nil or token == "" then
  error("set TASKFLY_NODE_TOKEN to the node's auth token")
end

wrk.method = "GET"
wrk.path = "/api/v1/nodes/assets"
wrk.headers["Authorization"] = "Bearer " .. token
