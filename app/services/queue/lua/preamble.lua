-- Shared by every script. Each script is loaded as: the constants store.py generates from its
-- Python definitions (P, PRIORITIES, the key names, ImageStatus, QueueState, Outcome, ...), then
-- this file, then the head of its own file (before the first "-- @script"), then its section.
-- The key layout is documented once, in store.py.

-- Every time that decides something (leases, reaping, timestamps, throughput buckets, webhook
-- schedules) is Redis's own clock, so hosts whose clocks disagree still agree on what has expired.
-- Scripts are replicated by their effects (Redis 7, Valkey), so reading TIME before writing is safe.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function qkey(qid) return P .. 'q:{' .. qid .. '}' end
local function ukey(uk) return P .. 'u:' .. uk end
local function ring(model, prio) return P .. 's:' .. model .. ':' .. prio end
local function uring(model, prio, uk) return ring(model, prio) .. ':' .. uk end
local function pend_key(model) return P .. 'pend:' .. model end
local function tp_key(model, bucket) return P .. 'tp:' .. model .. ':' .. bucket end

local function meta(q)
  local v = redis.call('HMGET', q, 'uk', 'model', 'priority', 'status', 'total', 'pending', 'running',
    'succeeded', 'failed', 'cancelled', 'finished_at', 'cursor', 'cut')
  if not v[1] then return nil end
  return {uk = v[1], model = v[2], priority = v[3], status = v[4], total = tonumber(v[5]),
    pending = tonumber(v[6]), running = tonumber(v[7]), succeeded = tonumber(v[8]),
    failed = tonumber(v[9]), cancelled = tonumber(v[10]), finished_at = v[11],
    cursor = tonumber(v[12]), cut = v[13]}
end

local function counts_of(q)
  local v = redis.call('HMGET', q, 'status', 'total', 'pending', 'running', 'succeeded', 'failed', 'cancelled')
  return {status = v[1], total = tonumber(v[2]), pending = tonumber(v[3]), running = tonumber(v[4]),
    succeeded = tonumber(v[5]), failed = tonumber(v[6]), cancelled = tonumber(v[7])}
end

-- A queue's side keys are created lazily; give each the queue's own remaining lifetime.
local function touch(q, key)
  if redis.call('TTL', key) == -1 then
    local t = redis.call('TTL', q)
    if t > 0 then redis.call('EXPIRE', key, t) end
  end
end

-- What a status or one of the user's lists shows has changed: bump the versions their ETags are
-- made from (VERSION_FIELD of the queue's hash, and the user's :version for history). Every state
-- change emits an event, and emit() calls this; a script that changes what a status shows without
-- an event calls it itself.
local function changed(qid, uk)
  local q = qkey(qid)
  redis.call('HINCRBY', q, VERSION_FIELD, 1)
  local version = ukey(uk) .. ':version'
  redis.call('INCR', version)
  touch(q, version)
end

local function emit(qid, uk, ev, now)
  ev.queue_id = qid
  ev.ts = now
  local c = counts_of(qkey(qid))
  ev.queue_status = c.status
  c.status = nil
  ev.counts = c
  local data = cjson.encode(ev)
  local q = qkey(qid)
  local id = redis.call('XADD', q .. ':ev', '*', 'd', data)
  if redis.call('HEXISTS', q, 'webhook') == 1 then redis.call('ZADD', WEBHOOKS_DUE_KEY, 'NX', ev.ts, qid) end
  local uev = ukey(uk) .. ':ev'
  redis.call('XADD', uev, 'MAXLEN', '~', USER_EVENTS_MAXLEN, '*', 'q', qid, 'i', id, 'd', data)
  -- The user's stream serves GET /events, a live stream: it keeps the last USER_EVENTS_KEEP_SECONDS
  -- (a client away longer reloads its lists; each queue's own stream keeps all its events), so an
  -- active user costs at most that much of events, and an idle one nothing once it has passed.
  redis.call('XTRIM', uev, 'MINID', now - USER_EVENTS_KEEP_SECONDS * 1000)
  redis.call('EXPIRE', uev, USER_EVENTS_KEEP_SECONDS)
  changed(qid, uk)
end

-- A member joining a ring goes to its front: a user who had nothing waiting is served next, so
-- a small batch starts within one image of any other user's big one (then takes its turn).
local function ring_join(key, member)
  if redis.call('ZSCORE', key, member) then return end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local score = first[2] and (tonumber(first[2]) - 1) or redis.call('INCR', SEQ_KEY)
  redis.call('ZADD', key, score, member)
end

local function sched_add(qid, uk, model, prio)
  ring_join(uring(model, prio, uk), qid)
  ring_join(ring(model, prio), uk)
end

local function sched_remove(qid, uk, model, prio)
  local ur = uring(model, prio, uk)
  redis.call('ZREM', ur, qid)
  if redis.call('ZCARD', ur) == 0 then redis.call('ZREM', ring(model, prio), uk) end
end

-- HINCRBY that skips zero: Lua renders -0 as "-0", which Redis rejects as a non-integer.
local function incr(key, fieldname, delta)
  if delta ~= 0 then redis.call('HINCRBY', key, fieldname, delta) end
end

-- What an unfinished queue holds of the global counters, kept outside its own keys (OPEN_KEY: its
-- owner, model and priority; OPEN_COUNTS_KEY: "<qid>:p" pending and "<qid>:r" running images), so
-- that whoever finds it expired before it finished can give them back (settle_gone).
local function open_queue(qid, m)
  redis.call('HSET', OPEN_KEY, qid, cjson.encode({uk = m.uk, model = m.model, priority = m.priority}))
end

local function close_queue(qid)
  redis.call('HDEL', OPEN_KEY, qid)
  redis.call('HDEL', OPEN_COUNTS_KEY, qid .. ':p', qid .. ':r')
end

local function add_running(qid, delta)
  redis.call('HINCRBY', OPEN_COUNTS_KEY, qid .. ':r', delta)
end

local function add_pending(qid, m, delta)
  if delta == 0 then return end
  redis.call('HINCRBY', pend_key(m.model), m.priority, delta)
  redis.call('HINCRBY', ukey(m.uk) .. ':stats', 'pending', delta)
  redis.call('HINCRBY', OPEN_COUNTS_KEY, qid .. ':p', delta)
end

local function set_ttl(qid, ttl)
  local q = qkey(qid)
  for _, s in ipairs(QUEUE_KEY_SUFFIXES) do redis.call('EXPIRE', q .. s, ttl) end
  -- The queue's objects in the image store are swept once its keys have expired.
  redis.call('ZADD', GC_KEY, server_now() + ttl * 1000, qid)
end

-- Lengthens a key's lifetime to `ttl` (never shortens it); a key without one gets it.
local function extend_ttl(key, ttl)
  local t = redis.call('TTL', key)
  if t == -1 or (t >= 0 and t < ttl) then redis.call('EXPIRE', key, ttl) end
end

local function set_user_ttl(uk, ttl)
  local u = ukey(uk)
  for _, s in ipairs(USER_KEY_SUFFIXES) do extend_ttl(u .. s, ttl) end
end

-- A queue that is worked on keeps at least half its safety TTL ahead of it (and its user's keys with
-- it): the safety TTL bounds how long a queue may sit untouched, not how long it may run.
local function keep_alive(qid, uk, safety)
  local q = qkey(qid)
  -- A finished queue has its own, shorter lifetime (QUEUE_TTL): a late renewal must not stretch it.
  if redis.call('TTL', q) * 2 >= safety or redis.call('HEXISTS', q, 'finished_at') == 1 then return end
  set_ttl(qid, safety)
  set_user_ttl(uk, safety)
end

-- A queue that expired before it finished: what it held of the global counters (pending per model,
-- its user's pending count and active set, images in flight, its place in the schedule) is given
-- back, once. Its leases go as they are met (complete, reap), without touching the counters again.
local function settle_gone(qid)
  local raw = redis.call('HGET', OPEN_KEY, qid)
  if not raw then return end
  local info = cjson.decode(raw)
  local pending = tonumber(redis.call('HGET', OPEN_COUNTS_KEY, qid .. ':p') or '0')
  local running = tonumber(redis.call('HGET', OPEN_COUNTS_KEY, qid .. ':r') or '0')
  local u = ukey(info.uk)
  if pending ~= 0 then
    redis.call('HINCRBY', pend_key(info.model), info.priority, -pending)
    if redis.call('EXISTS', u .. ':stats') == 1 then redis.call('HINCRBY', u .. ':stats', 'pending', -pending) end
  end
  if running ~= 0 and tonumber(redis.call('HINCRBY', INFLIGHT_KEY, info.model, -running)) < 0 then
    redis.call('HSET', INFLIGHT_KEY, info.model, 0)
  end
  redis.call('ZREM', u .. ':active', qid)
  sched_remove(qid, info.uk, info.model, info.priority)
  close_queue(qid)
end

local function finalize_if_done(qid, now, ttl, user_ttl)
  local q = qkey(qid)
  local m = meta(q)
  if m.pending > 0 or m.running > 0 or m.finished_at then return m.status end
  local status = m.status
  if status ~= QueueState.CANCELLED then
    if m.succeeded > 0 then status = QueueState.COMPLETED
    elseif m.failed > 0 then status = QueueState.FAILED
    else status = QueueState.CANCELLED end
  end
  redis.call('HSET', q, 'status', status, 'finished_at', now)
  close_queue(qid)
  set_ttl(qid, ttl)
  local u = ukey(m.uk)
  redis.call('ZREM', u .. ':active', qid)
  redis.call('ZADD', u .. ':hist', now, qid)
  set_user_ttl(m.uk, user_ttl)
  emit(qid, m.uk, {type = 'queue', status = status, final = true}, now)
  return status
end

-- A running image's share of its steps done (0 to 1; 0 while its steps are unknown): what it adds to
-- its queue's `pf` (lua/progress.lua) until it settles (settle.lua).
local function step_share(step, steps)
  return (steps and steps > 0) and math.min(1, step / steps) or 0
end

local function get_rec(q, idx)
  local raw = redis.call('HGET', q .. ':img', idx)
  if not raw then return nil end
  return cjson.decode(raw)
end

-- Every record write changes the queue's status (progress too, which emits no event), so it bumps
-- the queue's version whether or not an event follows.
local function put_rec(q, idx, rec)
  redis.call('HSET', q .. ':img', idx, cjson.encode(rec))
  touch(q, q .. ':img')
  redis.call('HINCRBY', q, VERSION_FIELD, 1)
end
