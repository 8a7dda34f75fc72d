-- wrk script: `POST /api/v1/nodes/heartbeat` with an empty JSON object, as the node agent sends
-- it, authenticated with the node token in TASKFLY_NODE_TOKEN. Used by scripts/bench-heartbeat.sh
-- against the engine (`load --serve-one-node`) and the bare hyper baseline (which ignores it).
--
--   TASKFLY_NODE_TOKEN=<token> wrk -t2 -c64 -d10s -s benches/wrk/heartbeat.lua http://127.0.0.1:<port>

local token = os.getenv("TASKFLY_NODE_TOKEN")
if token == nil or token == "" then
  error("set TASKFLY_NODE_TOKEN to the node's auth token")
end

wrk.method = "POST"
wrk.path = "/api/v1/nodes/heartbeat"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token

-- No response() callback: it would cost wrk CPU on the same cores as the servers. wrk reports
-- answers other than 2xx/3xx as "Non-2xx or 3xx responses", which the script refuses.
