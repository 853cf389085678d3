-- The webhook deliveries' schedule: which queues have events due, and how far each has got.

-- @script webhook_lease
-- ARGV: limit, lease_ms. Leases queues whose webhook deliveries are due.
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', WEBHOOKS_DUE_KEY, '-inf', now, 'LIMIT', 0, limit)
for _, qid in ipairs(due) do redis.call('ZADD', WEBHOOKS_DUE_KEY, now + lease, qid) end
return due

-- @script webhook_progress
-- ARGV: qid, cursor, state_json, next_due_in_ms ('' = nothing left to send unless newer events arrived)
local qid, cursor, state, next_due = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local q = qkey(qid)
if redis.call('EXISTS', q) == 0 then
  redis.call('ZREM', WEBHOOKS_DUE_KEY, qid)
  return 0
end
redis.call('HSET', q, 'wh_cursor', cursor, 'webhook_state', state)
if next_due ~= '' then
  redis.call('ZADD', WEBHOOKS_DUE_KEY, server_now() + tonumber(next_due), qid)
  return 1
end
local newest = redis.call('XREVRANGE', q .. ':ev', '+', '-', 'COUNT', 1)
if #newest > 0 and newest[1][1] ~= cursor then
  redis.call('ZADD', WEBHOOKS_DUE_KEY, 0, qid)
  return 1
end
redis.call('ZREM', WEBHOOKS_DUE_KEY, qid)
return 0
