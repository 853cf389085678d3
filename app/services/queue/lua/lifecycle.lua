-- What a queue's owner does to it once created: cancel, retry, delete.

-- @script cancel
-- ARGV: qid, uk, ttl, user_ttl
local qid, uk, now = ARGV[1], ARGV[2], server_now()
local q = qkey(qid)
local m = meta(q)
if (not m) or m.uk ~= uk then return CancelOutcome.NOT_FOUND end
if m.status == QueueState.CANCELLED then return CancelOutcome.NOOP end
if m.finished_at then return CancelOutcome.CONFLICT end
local cancelled = 0
local retry = redis.call('LRANGE', q .. ':retry', 0, -1)
for _, idx in ipairs(retry) do
  local rec = get_rec(q, idx) or {a = 0}
  rec.s = ImageStatus.CANCELLED
  rec.t1 = now
  put_rec(q, idx, rec)
  cancelled = cancelled + 1
end
redis.call('DEL', q .. ':retry')
if m.cut ~= '1' and m.cursor < m.total then cancelled = cancelled + (m.total - m.cursor) end
redis.call('HSET', q, 'cut', '1', 'status', QueueState.CANCELLED, 'cancel_requested_at', now)
incr(q, 'pending', -cancelled)
incr(q, 'cancelled', cancelled)
incr(STATS_KEY, ImageStatus.CANCELLED, cancelled)
add_pending(qid, m, -cancelled)
sched_remove(qid, uk, m.model, m.priority)
emit(qid, uk, {type = 'queue', status = QueueState.CANCELLED}, now)
redis.call('PUBLISH', CANCEL_CHANNEL, qid)
finalize_if_done(qid, now, tonumber(ARGV[3]), tonumber(ARGV[4]))
return CancelOutcome.CANCELLED

-- @script retry
-- ARGV: qid, uk, include_cancelled ('1'|'0'), safety_ttl, max_pending, max_active
-- A retry puts images back in the queue and the queue back among the user's active ones, so it is
-- admitted as a create is (create.lua), against the same counters and in the same script. What it
-- would bring back is counted before anything is written: a refused retry changes nothing.
local qid, uk, with_cancelled, safety = ARGV[1], ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
local max_pending, max_active = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = server_now()
local q = qkey(qid)
local m = meta(q)
if (not m) or m.uk ~= uk then return {RetryOutcome.NOT_FOUND, 0} end
if not m.finished_at then return {RetryOutcome.CONFLICT, 0} end
local from_failed, from_cancelled = 0, 0
local picked = {}  -- index, then its record, of each image run again
local recs = redis.call('HGETALL', q .. ':img')
for i = 1, #recs, 2 do
  local rec = cjson.decode(recs[i + 1])
  if rec.s == ImageStatus.FAILED or (with_cancelled and rec.s == ImageStatus.CANCELLED) then
    if rec.s == ImageStatus.FAILED then from_failed = from_failed + 1 else from_cancelled = from_cancelled + 1 end
    picked[#picked + 1] = recs[i]
    picked[#picked + 1] = rec
  end
end
-- Images a cancel cut off before they were ever claimed have no record: the cursor reaches them again.
local uncut = with_cancelled and m.cut == '1' and m.cursor < m.total
if uncut then from_cancelled = from_cancelled + (m.total - m.cursor) end
local again = from_failed + from_cancelled
if again == 0 then return {RetryOutcome.NOTHING, 0} end
local u = ukey(uk)
-- A finished queue has left the active set (finalize_if_done); the check allows for one that has not.
if max_active > 0 and not redis.call('ZSCORE', u .. ':active', qid)
    and redis.call('ZCARD', u .. ':active') >= max_active then
  return {RetryOutcome.LIMIT_ACTIVE, again, tostring(max_active)}
end
local pend = tonumber(redis.call('HGET', u .. ':stats', 'pending') or '0')
if max_pending > 0 and pend + again > max_pending then
  return {RetryOutcome.LIMIT_PENDING, again, tostring(max_pending - pend)}
end
for i = 1, #picked, 2 do
  local rec = picked[i + 1]
  rec.s = ImageStatus.PENDING
  rec.e = nil
  rec.t1 = nil
  rec.l = 0
  put_rec(q, picked[i], rec)
  redis.call('RPUSH', q .. ':retry', picked[i])
end
if uncut then redis.call('HSET', q, 'cut', '0') end
local status = QueueState.RUNNING
if m.succeeded + (m.failed - from_failed) + (m.cancelled - from_cancelled) == 0 then status = QueueState.PENDING end
incr(q, 'failed', -from_failed)
incr(q, 'cancelled', -from_cancelled)
redis.call('HINCRBY', q, 'pending', again)
redis.call('HINCRBY', q, 'attempt', 1)
redis.call('HDEL', q, 'finished_at', 'cancel_requested_at')
redis.call('HSET', q, 'status', status)
m.status = status
open_queue(qid, m)
add_pending(qid, m, again)
sched_add(qid, uk, m.model, m.priority)
redis.call('ZREM', u .. ':hist', qid)
redis.call('ZADD', u .. ':active', now, qid)
set_ttl(qid, safety)
emit(qid, uk, {type = 'queue', status = status, retried = again}, now)
set_user_ttl(uk, safety)  -- the user's keys it touched may have expired: none is left without a lifetime
return {RetryOutcome.RETRIED, again}

-- @script delete
-- ARGV: qid, uk
local qid, uk = ARGV[1], ARGV[2]
local q = qkey(qid)
local m = meta(q)
if (not m) or m.uk ~= uk then return DeleteOutcome.NOT_FOUND end
if (not m.finished_at) or m.running > 0 then return DeleteOutcome.CONFLICT end
changed(qid, uk)
for _, s in ipairs(QUEUE_KEY_SUFFIXES) do redis.call('DEL', q .. s) end
close_queue(qid)
local u = ukey(uk)
redis.call('ZREM', u .. ':hist', qid)
redis.call('ZREM', u .. ':active', qid)
return DeleteOutcome.DELETED
