-- The webhook deliveries' schedule: which queues have events due, who is sending them, and how far
-- each has got.

-- Whether stream id a ("ms-seq") comes after b.
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm or 0), tonumber(bs or 0)
  return am > bm or (am == bm and as > bs)
end

-- @script webhook_lease
-- ARGV: limit, lease_ms. Leases queues whose webhook deliveries are due: returns queue id and fencing
-- token pairs. A new lease's token makes an earlier holder's progress refused, so a worker whose
-- lease lapsed mid-round cannot send on or move the cursor.
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = server_now()
local due = redis.call('ZRANGEBYSCORE', WEBHOOKS_DUE_KEY, '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, qid in ipairs(due) do
  local q = qkey(qid)
  if redis.call('EXISTS', q) == 0 then
    redis.call('ZREM', WEBHOOKS_DUE_KEY, qid)
  else
    redis.call('ZADD', WEBHOOKS_DUE_KEY, now + lease, qid)
    out[#out + 1] = qid
    out[#out + 1] = redis.call('HINCRBY', q, 'wh_lease', 1)
  end
end
return out

-- @script webhook_progress
-- ARGV: qid, token, cursor, state_json, next_due_in_ms ('' = nothing left to send unless newer events
-- arrived; 'hold' = the round goes on: keep the lease hold_ms longer), hold_ms.
-- Returns -1 when the token is no longer the queue's (another worker holds it now), else 0 or 1.
local qid, token, cursor, state, next_due = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local q = qkey(qid)
if redis.call('EXISTS', q) == 0 then
  redis.call('ZREM', WEBHOOKS_DUE_KEY, qid)
  return 0
end
if tonumber(redis.call('HGET', q, 'wh_lease') or '0') ~= token then return -1 end
local current = redis.call('HGET', q, 'wh_cursor') or '0-0'
if id_after(cursor, current) then
  current = cursor
  redis.call('HSET', q, 'wh_cursor', cursor)
end
if redis.call('HGET', q, 'webhook_state') ~= state then
  redis.call('HSET', q, 'webhook_state', state)
  changed(qid, redis.call('HGET', q, 'uk'))  -- a status shows its webhook's deliveries
end
if next_due == 'hold' then
  redis.call('ZADD', WEBHOOKS_DUE_KEY, server_now() + tonumber(ARGV[6]), qid)
  return 1
end
if next_due ~= '' then
  redis.call('ZADD', WEBHOOKS_DUE_KEY, server_now() + tonumber(next_due), qid)
  return 1
end
local newest = redis.call('XREVRANGE', q .. ':ev', '+', '-', 'COUNT', 1)
if #newest > 0 and id_after(newest[1][1], current) then
  redis.call('ZADD', WEBHOOKS_DUE_KEY, 0, qid)
  return 1
end
redis.call('ZREM', WEBHOOKS_DUE_KEY, qid)
return 0
