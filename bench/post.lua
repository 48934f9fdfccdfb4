-- wrk script: POST one task per request
wrk.method = "POST"
wrk.body = '{"type":"echo","payload":{"x":1}}'
wrk.headers["Content-Type"] = "application/json"
