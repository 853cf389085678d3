-- Reads that must agree with each other, in one round trip.

-- The schedule facts that position and ETA need for an unfinished queue: claimable images per
-- priority, its user's rank and the ring's size, its own rank among its user's queues, then the
-- model's completions per throughput bucket (newest first). Nothing for a finished queue.
local function schedule_of(qid, m, nbuckets, now)
  if m.finished_at then return {} end
  local bucket = math.floor(now / THROUGHPUT_BUCKET_MS)
  local pend = redis.call('HMGET', pend_key(m.model), unpack(PRIORITIES))
  local r = ring(m.model, m.priority)
  local tp = {}
  for i = 0, nbuckets do tp[#tp + 1] = tp_key(m.model, bucket - i) end
  local rates = redis.call('MGET', unpack(tp))
  local extra = {pend[1] or '0', pend[2] or '0', pend[3] or '0', redis.call('ZRANK', r, m.uk) or -1,
    redis.call('ZCARD', r), redis.call('ZRANK', uring(m.model, m.priority, m.uk), qid) or -1}
  for i = 1, #rates do extra[#extra + 1] = rates[i] or '0' end
  return extra
end

-- @script status
-- ARGV: qid, buckets, first, last, known versions (comma-separated), with_spec ('1'|'0').
-- One round trip for a status with a page of its images (indexes first..last; none when
-- last < first): the meta hash, the schedule facts and the server's time (ms), then, unless the
-- queue's version is among the known ones (the caller holds that answer already), its spec (if
-- asked for, else empty) and the records of the page as index, record pairs (an empty spec and no
-- records for an empty page). Meta and records agree.
local qid, nbuckets, first, last = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = server_now()
local q = qkey(qid)
local flat = redis.call('HGETALL', q)
if #flat == 0 then return {} end
local m = meta(q)
local out = {flat, schedule_of(qid, m, nbuckets, now), now}
local version = redis.call('HGET', q, VERSION_FIELD) or '0'
last = math.min(last, m.total - 1)
if last < first then
  out[4], out[5] = '', {}
  return out
end
if string.find(',' .. ARGV[5] .. ',', ',' .. version .. ',', 1, true) then return out end
out[4] = (ARGV[6] == '1') and (redis.call('GET', q .. ':spec') or '') or ''
local recs = {}
if last - first >= RECORDS_ALL_ABOVE then
  -- A large page: the whole hash in one call (only images that have left "never claimed" have a record).
  local all = redis.call('HGETALL', q .. ':img')
  for i = 1, #all, 2 do
    local idx = tonumber(all[i])
    if idx >= first and idx <= last then
      recs[#recs + 1] = idx
      recs[#recs + 1] = all[i + 1]
    end
  end
else
  for idx = first, last do
    local rec = redis.call('HGET', q .. ':img', idx)
    if rec then
      recs[#recs + 1] = idx
      recs[#recs + 1] = rec
    end
  end
end
out[5] = recs
return out

-- @script summaries
-- ARGV: uk, buckets. The user's unfinished queues, newest first, in one round trip: the server's
-- time (ms), then per queue its id, meta hash and schedule facts (as status); a queue whose keys
-- have expired comes with an empty meta.
local uk, nbuckets = ARGV[1], tonumber(ARGV[2])
local now = server_now()
local out = {now}
for _, qid in ipairs(redis.call('ZREVRANGE', ukey(uk) .. ':active', 0, -1)) do
  local q = qkey(qid)
  local flat = redis.call('HGETALL', q)
  out[#out + 1] = qid
  out[#out + 1] = flat
  out[#out + 1] = (#flat > 0) and schedule_of(qid, meta(q), nbuckets, now) or {}
end
return out

-- @script history_version
-- ARGV: uk, ttl_ms. What a user's history depends on besides its query: the version of their
-- queues and how many finished queues are within the TTL (expired ones are dropped first).
local uk, ttl_ms = ARGV[1], tonumber(ARGV[2])
local hist = ukey(uk) .. ':hist'
redis.call('ZREMRANGEBYSCORE', hist, '-inf', '(' .. (server_now() - ttl_ms))
return {redis.call('GET', ukey(uk) .. ':version') or '0', redis.call('ZCARD', hist)}

-- @script throughput
-- ARGV: model, buckets. A model's completions per throughput bucket over the window, newest
-- first, then the server's time (ms).
local model, nbuckets = ARGV[1], tonumber(ARGV[2])
local now = server_now()
local bucket = math.floor(now / THROUGHPUT_BUCKET_MS)
local tp = {}
for i = 0, nbuckets do tp[#tp + 1] = tp_key(model, bucket - i) end
local out = redis.call('MGET', unpack(tp))
for i = 1, #out do out[i] = out[i] or '0' end
out[#out + 1] = now
return out
