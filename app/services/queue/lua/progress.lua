-- Step progress of running images, as their workers report it (throttled there, at most a few
-- writes a second per image). It lives in the image's record (step `ps` of `pn`, written at `pt`,
-- `pv` counting its previews) until the image settles, which clears it (settle.lua); the latest
-- preview in a short-lived key of its own; and each write is an entry of the user's progress
-- stream, which the event streams merge live and never replay. The queue's meta keeps what its
-- ETA needs: `pf`, the sum of its running images' fractions, and `pe`, a running estimate (ms) of
-- how long one image takes: its time so far, and its steps left at the rate of its latest steps.

-- @script progress
-- ARGV: ttl, maxlen, then six per image: qid, idx, attempt, step, steps, preview ('' for none).
-- Writes only for images still running at that attempt (a late write after the image settled or
-- moved to another attempt is dropped). Returns how many were written.
local ttl, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2])
local ESTIMATE_MAX_MS = 86400000
local now = server_now()
local written = 0
for i = 3, #ARGV, 6 do
  local qid, idx, attempt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local q = qkey(qid)
  local uk = redis.call('HGET', q, 'uk')
  local rec = uk and get_rec(q, idx)
  if rec and rec.s == ImageStatus.RUNNING and tonumber(rec.a) == attempt then
    local step, steps = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    local before, fraction = step_share(rec.ps, rec.pn), step_share(step, steps)
    if fraction ~= before then redis.call('HINCRBYFLOAT', q, 'pf', fraction - before) end
    -- The step rate between this write and the last, not since the claim: time before the steps
    -- (a model loading, the server's own queue) says nothing of how long the rest will take.
    if rec.ps and rec.pt and rec.t0 and step > rec.ps and steps > 0 then
      local per_step = (now - tonumber(rec.pt)) / (step - rec.ps)
      local estimate = math.min(now - tonumber(rec.t0) + per_step * math.max(0, steps - step), ESTIMATE_MAX_MS)
      local pe = tonumber(redis.call('HGET', q, 'pe'))
      if pe then estimate = 0.7 * pe + 0.3 * estimate end
      redis.call('HSET', q, 'pe', math.floor(estimate))
    end
    rec.ps, rec.pn, rec.pt = step, steps, now
    local pv = q .. PREVIEW_KEY_SUFFIX .. idx
    if ARGV[i + 5] ~= '' then
      rec.pv = (rec.pv or 0) + 1
      redis.call('SET', pv, ARGV[i + 5], 'EX', ttl)
    elseif rec.pv then
      redis.call('EXPIRE', pv, ttl)
    end
    put_rec(q, idx, rec)
    local key = ukey(uk) .. PROGRESS_STREAM_SUFFIX
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'd', cjson.encode({
      type = 'image.progress', queue_id = qid, index = tonumber(idx), attempt = attempt,
      step = rec.ps, steps = rec.pn, pv = rec.pv or 0, ts = now}))
    redis.call('EXPIRE', key, ttl)
    written = written + 1
  end
end
return written
