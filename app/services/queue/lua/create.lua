-- A new queue: admission limits, the Idempotency-Key, its meta and spec, its place in the schedule.

-- @script create
-- ARGV: qid, uk, safety_ttl, meta_json, spec, idem_key, fingerprint, idem_ttl, max_pending, max_active
local qid, uk, safety = ARGV[1], ARGV[2], tonumber(ARGV[3])
local fields = cjson.decode(ARGV[4])
local idem_key, fingerprint, idem_ttl = ARGV[6], ARGV[7], tonumber(ARGV[8])
local max_pending, max_active = tonumber(ARGV[9]), tonumber(ARGV[10])
local now = server_now()
if idem_key ~= '' then
  local prior = redis.call('GET', idem_key)
  -- A key whose queue is gone (deleted, or expired before the key) no longer names anything: the
  -- request is served as a new one and the key taken over.
  if prior then
    local p = cjson.decode(prior)
    if redis.call('EXISTS', qkey(p.q)) == 1 then
      if p.f ~= fingerprint then return {CreateOutcome.CONFLICT, p.q} end
      return {CreateOutcome.REPLAY, p.q}
    end
  end
end
local u = ukey(uk)
local total = tonumber(fields.total)
if max_active > 0 and redis.call('ZCARD', u .. ':active') >= max_active then
  return {CreateOutcome.LIMIT_ACTIVE, tostring(max_active)}
end
-- A queue larger than max_pending on its own never gets here (validation.py answers it with a 422):
-- what is refused here is what waiting for other images to finish cures.
local pend = tonumber(redis.call('HGET', u .. ':stats', 'pending') or '0')
if max_pending > 0 and pend + total > max_pending then
  return {CreateOutcome.LIMIT_PENDING, tostring(max_pending - pend)}
end
local q = qkey(qid)
local flat = {}
for k, v in pairs(fields) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', q, unpack(flat))
redis.call('HSET', q, 'uk', uk, 'status', QueueState.PENDING, 'pending', total, 'running', 0, 'succeeded', 0,
  'failed', 0, 'cancelled', 0, 'cursor', 0, 'created_at', now)
redis.call('SET', q .. ':spec', ARGV[5])
local m = meta(q)
sched_add(qid, uk, m.model, m.priority)
open_queue(qid, m)
add_pending(qid, m, total)
redis.call('ZADD', u .. ':active', now, qid)
emit(qid, uk, {type = 'queue', status = QueueState.PENDING}, now)
set_ttl(qid, safety)
set_user_ttl(uk, safety)
if idem_key ~= '' then
  redis.call('SET', idem_key, cjson.encode({q = qid, f = fingerprint}), 'EX', idem_ttl)
end
return {CreateOutcome.CREATED, qid}
