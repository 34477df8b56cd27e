"""The Lua scripts that make the command path's Redis updates atomic.

Each multi-step change runs as one script, because another instance (or its janitor)
may act on the same keys at the same moment:

* ``UNREGISTER``: delete registry entries only if they still name this instance. A
  HGET-then-HDEL lets a device that just moved to another instance lose its entry
  (docs/design.rst, 'Every multi-step Redis change is one script').
* ``SETTLE``: publish a command's terminal status *and* acknowledge/delete its stream
  entry in one step, so a crash between the two cannot produce a second terminal status;
  offline commands that failed for a retryable reason go back to wait for the next login.
  It acts only while the entry is still pending in the group (``XACK`` answers 1), so
  running it again is harmless: the consumer retries it after a failed call whose first
  run may have happened (the connection dropped before the reply).
* After an offline command goes back to wait because the session of its attempt is gone
  (``socket_closed``, ``device_not_connected``, a janitor's ``instance_gone``), the device
  may already be logged in again (a reconnect on the same or another instance that
  collected the waiting list before the command was back): if the registry names a live
  instance, that instance gets a ``flush`` entry and delivers it now. After a ``timeout``
  or ``queue_full`` the attempt's session may still be there, but the device may also
  have logged in again (the old socket half-open): if the registry names another live
  instance, that one gets the ``flush``; the consumer itself takes the list again when
  the device's session on this instance is a newer one than the attempt's.
* ``DELIVERED``: publish the ``delivered`` progress status once per entry, and only while
  the entry is still in the stream (not settled): retried after a failed call (whose
  first run may have happened), it is never published twice and never lands after the
  command's terminal status. The mark lives in ``commands:delivered:{instance_id}`` until
  ``SETTLE`` (or a janitor's ``JANITOR_STREAM``) removes it with the entry.
* ``JANITOR_REGISTRY`` / ``JANITOR_STREAM``: act on a dead instance's keys only while its
  heartbeat is still absent (an instance restarting with the same id wins).
* ``TAKE_OFFLINE``, ``STORE_OFFLINE``, ``EXPIRE_OFFLINE``: offline delivery.

Scripts that touch offline keys derive some key names inside the script (the IMEI's list
and the command's hash are only known from the data), which is fine on one Redis server
and on Redis with replicas; it is not Redis Cluster safe.
"""

from __future__ import annotations

from typing import Final

from twisted.internet.defer import Deferred

from teltonika.commands.messages import (
    COMMANDS_VERSION,
    REGISTRY_KEY,
    RETRYABLE,
    SESSION_GONE,
    heartbeat_key,
    outbound_stream,
)
from teltonika.redis.connection import RedisConnection, Reply

_STATUS_LUA: Final = """
local function status(id, imei, codec, st, reason, inst, now, attempt)
  local a = ''
  if attempt and tonumber(attempt) and tonumber(attempt) > 0 then a = tostring(attempt) end
  return {'v', '1', 'id', id, 'imei', imei, 'codec', codec, 'status', st, 'reason', reason,
          'response', '', 'response_hex', '', 'instance_id', inst, 'at_ms', now, 'attempt', a}
end
local function publish(key, maxlen, fields)
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
local function tomap(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end
"""

_FLUSH_LUA: Final = f"""
-- skip: an instance not to ask (nil: any)
local function flush_if_online(id, imei, skip)
  local inst = redis.call('HGET', '{REGISTRY_KEY}', imei)
  if inst and inst ~= skip and redis.call('EXISTS', '{heartbeat_key("")}' .. inst) == 1 then
    redis.call('XADD', '{outbound_stream("")}' .. inst, '*', 'v', '{COMMANDS_VERSION}',
               'kind', 'flush', 'id', id, 'imei', imei)
  end
end
"""

UNREGISTER: Final = """
-- KEYS[1] registry; ARGV[1] instance id, ARGV[2..] IMEIs
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

REASSERT: Final = """
-- KEYS[1] registry; ARGV[1] instance id, ARGV[2..] IMEIs: claim only absent entries
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[1])
end
return n
"""

JANITOR_REGISTRY: Final = """
-- KEYS[1] registry, KEYS[2] the dead instance's heartbeat; ARGV[1] dead id, ARGV[2..] IMEIs
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

_RETRYABLE_LUA: Final = (
    "local RETRYABLE = {" + ", ".join(f"['{r}'] = true" for r in sorted(RETRYABLE)) + "}\n"
    "local SESSION_GONE = {" + ", ".join(f"['{r}'] = true" for r in sorted(SESSION_GONE)) + "}\n"
)

SETTLE: Final = (
    _STATUS_LUA
    + _FLUSH_LUA
    + _RETRYABLE_LUA
    + """
-- KEYS[1] outbound stream, KEYS[2] responses, KEYS[3] offline hash, KEYS[4] offline list,
-- KEYS[5] offline expiry zset, KEYS[6] delivered marks of the stream
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] offline '1'/'', ARGV[4] now ms,
-- ARGV[5] max attempts, ARGV[6] maxlen, ARGV[7..] status fields (flat)
-- Returns 'status|reason' of what was published, or '' when nothing was.
redis.call('HDEL', KEYS[6], ARGV[2])
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  -- not pending (any more): settled by an earlier run of this script, or the stream
  -- was failed by a janitor (instance_gone): one terminal status only
  redis.call('XDEL', KEYS[1], ARGV[2])
  return ''
end
redis.call('XDEL', KEYS[1], ARGV[2])
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
local m = tomap(fields)
local function set(name, value)
  for i = 1, #fields, 2 do if fields[i] == name then fields[i + 1] = value end end
end
local result = m['status']
if ARGV[3] == '1' then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return ''  -- already settled (expired, or a duplicate delivery)
  end
  if m['status'] == 'failed' and RETRYABLE[m['reason']] then
    local exp = tonumber(redis.call('HGET', KEYS[3], 'expires_at_ms'))
    local attempts = tonumber(redis.call('HGET', KEYS[3], 'attempts') or '0') or 0
    if exp == nil or exp <= tonumber(ARGV[4]) then
      set('reason', 'expired')
    elseif attempts >= tonumber(ARGV[5]) then
      set('reason', 'attempts_exhausted')
    else
      set('status', 'requeued')
      result = 'requeued'
      redis.call('RPUSH', KEYS[4], m['id'])
      if SESSION_GONE[m['reason']] then
        flush_if_online(m['id'], m['imei'], nil)
      else
        -- timeout, queue_full: the attempt's session may still be there, but the device
        -- may have logged in again elsewhere (the old socket half-open)
        flush_if_online(m['id'], m['imei'], m['instance_id'])
      end
    end
  end
  if result ~= 'requeued' then
    redis.call('DEL', KEYS[3])
    redis.call('ZREM', KEYS[5], m['id'])
  end
end
publish(KEYS[2], ARGV[6], fields)
local final = tomap(fields)
return final['status'] .. '|' .. final['reason']
"""
)

DELIVERED: Final = (
    _STATUS_LUA
    + """
-- KEYS[1] outbound stream, KEYS[2] responses, KEYS[3] delivered marks of the stream;
-- ARGV[1] entry id, ARGV[2] maxlen, ARGV[3..] status fields (flat).
-- Returns 1 when published, 0 when the entry is settled or was reported delivered.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[3], ARGV[1], '1') == 0 then return 0 end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
publish(KEYS[2], ARGV[2], fields)
return 1
"""
)

TAKE_OFFLINE: Final = (
    _STATUS_LUA
    + """
-- KEYS[1] offline list of the IMEI, KEYS[2] this instance's outbound stream,
-- KEYS[3] responses, KEYS[4] expiry zset
-- ARGV[1] instance id, ARGV[2] now ms, ARGV[3] max attempts, ARGV[4] maxlen
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
local now = tonumber(ARGV[2])
local sent = 0
for _, id in ipairs(ids) do
  local hkey = 'commands:offline:command:' .. id
  local f = tomap(redis.call('HGETALL', hkey))
  if f['id'] then
    local attempts = tonumber(f['attempts'] or '0') or 0
    local exp = tonumber(f['expires_at_ms'])
    local reason = nil
    if exp == nil or exp <= now then
      reason = 'expired'
    elseif attempts >= tonumber(ARGV[3]) then
      reason = 'attempts_exhausted'
    end
    if reason then
      publish(KEYS[3], ARGV[4],
              status(id, f['imei'], f['codec'], 'failed', reason, ARGV[1], ARGV[2], attempts))
      redis.call('DEL', hkey)
      redis.call('ZREM', KEYS[4], id)
    else
      attempts = attempts + 1
      redis.call('HSET', hkey, 'attempts', attempts)
      f['attempts'] = nil
      f['attempt'] = tostring(attempts)
      f['offline'] = '1'
      local entry = {}
      for k, v in pairs(f) do
        entry[#entry + 1] = k
        entry[#entry + 1] = v
      end
      redis.call('XADD', KEYS[2], '*', unpack(entry))
      sent = sent + 1
    end
  end
end
return sent
"""
)

STORE_OFFLINE: Final = (
    _STATUS_LUA
    + """
-- KEYS[1] command hash, KEYS[2] offline list, KEYS[3] expiry zset, KEYS[4] responses
-- ARGV[1] id, ARGV[2] expires_at_ms, ARGV[3] now ms, ARGV[4] maxlen, ARGV[5] sender name,
-- ARGV[6..] command fields (flat)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local m = tomap(fields)
redis.call('HSET', KEYS[1], 'attempts', '0', unpack(fields))
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
publish(KEYS[4], ARGV[4], status(ARGV[1], m['imei'], m['codec'], 'queued', '', ARGV[5], ARGV[3], 0))
return 1
"""
)

EXPIRE_OFFLINE: Final = (
    _STATUS_LUA
    + """
-- KEYS[1] expiry zset, KEYS[2] responses; ARGV[1] now ms, ARGV[2] maxlen,
-- ARGV[3] instance id, ARGV[4] limit
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local n = 0
for _, id in ipairs(ids) do
  local hkey = 'commands:offline:command:' .. id
  local f = tomap(redis.call('HGETALL', hkey))
  if not f['id'] then
    redis.call('ZREM', KEYS[1], id)
  elseif redis.call('LREM', 'commands:offline:' .. f['imei'], 0, id) > 0 then
    -- still waiting (not in flight): it expires now; in-flight ones settle on their own
    publish(KEYS[2], ARGV[2],
            status(id, f['imei'], f['codec'], 'failed', 'expired', ARGV[3], ARGV[1], f['attempts']))
    redis.call('DEL', hkey)
    redis.call('ZREM', KEYS[1], id)
    n = n + 1
  end
end
return n
"""
)

JANITOR_STREAM: Final = (
    _STATUS_LUA
    + _FLUSH_LUA
    + """
-- KEYS[1] the dead instance's outbound stream, KEYS[2] its heartbeat, KEYS[3] responses,
-- KEYS[4] its delivered marks
-- ARGV[1] dead instance id, ARGV[2] now ms, ARGV[3] maxlen, ARGV[4] this instance's id
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local n = 0
for _, entry in ipairs(entries) do
  local f = tomap(entry[2])
  if f['kind'] ~= 'flush' and f['id'] then
    local codec = f['codec'] or '12'
    if f['offline'] == '1' and f['imei'] then
      local hkey = 'commands:offline:command:' .. f['id']
      if redis.call('EXISTS', hkey) == 1 then
        redis.call('RPUSH', 'commands:offline:' .. f['imei'], f['id'])
        local st = status(f['id'], f['imei'], codec, 'requeued', 'instance_gone', ARGV[4],
                          ARGV[2], f['attempt'])
        publish(KEYS[3], ARGV[3], st)
        flush_if_online(f['id'], f['imei'], nil)
        n = n + 1
      end
    else
      local st = status(f['id'], f['imei'] or '', codec, 'failed', 'instance_gone', ARGV[4],
                        ARGV[2], 0)
      publish(KEYS[3], ARGV[3], st)
      n = n + 1
    end
  end
end
redis.call('DEL', KEYS[1], KEYS[4])
return n
"""
)


def run_script(
    redis: RedisConnection, script: str, keys: list[str], args: list[str]
) -> Deferred[Reply]:
    """EVALSHA *script* (txredisapi loads it with EVAL on the first call or after NOSCRIPT)."""
    return redis.eval(script, keys, args)
