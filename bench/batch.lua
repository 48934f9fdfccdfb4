-- wrk script: POST one batch of BATCH_SIZE tasks (default 1000) per request
local size = tonumber(os.getenv("BATCH_SIZE") or "1000")
local task = '{"type":"echo","payload":{"x":1}}'
local tasks = {}
for i = 1, size do
  tasks[i] = task
end
wrk.method = "POST"
wrk.body = '{"tasks":[' .. table.concat(tasks, ",") .. ']}'
wrk.headers["Content-Type"] = "application/json"
