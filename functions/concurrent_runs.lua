#!lua name=concurrent_runs
--[[
concurrent_runs: a counting semaphore with leases, one sorted set per limit key.

Clock: every time is Redis server time (TIME) in milliseconds. Callers never
pass a timestamp, so client clock skew cannot change a decision.

Layout of the sorted set at KEY. The score regions never overlap, so one key
holds the slots and the queue of waiters, and every call touches one key (which
keeps the library usable on Redis Cluster without hash tags):

    member          score                          meaning
    TOKEN           lease end                      a slot (score < LEASE_BASE)
    "\0l" .. TOKEN  LEASE_BASE + waiter lease end  a waiter is still waiting
    "\0q" .. TOKEN  ORDER_BASE + arrival time      the waiter's place in line

A slot or a waiter whose lease end is at or before now has ended: it never
counts, whether or not it has been removed yet. Ended entries are removed a
bounded batch at a time, so that no call does work proportional to the number
of ended leases.
]]

local VERSION = '1.1.0'

local LEASE_BASE = 2 ^ 46 -- ms since the epoch stay below this until the year 4199
local ORDER_BASE = 2 ^ 47
local MAX_TIMEOUT_MS = 2 ^ 40 -- about 34 years; keeps every score an exact integer
local MAX_SLOTS_LIMIT = 2 ^ 31 - 1
local MAX_TOKEN_BYTES = 256
local CLEANUP_BATCH = 16 -- ended entries removed by a call that finds its key full
local REAP_BATCH = 250 -- ended entries removed by one runs_reap call

local WAITER_LEASE_PREFIX = '\0l'
local WAITER_ORDER_PREFIX = '\0q'

-- redis.call and string.format, bound by `registered` each time a library
-- function starts, because the globals are not reachable while the library
-- loads. Upvalues are cheaper to reach than globals on every command.
local call
local format
local match

-- Argument checks -----------------------------------------------------------

-- Quote a caller's value for an error reply: printable ASCII only, cut short.
local function quote(value)
    local text = tostring(value)
    local cut = string.sub(text, 1, 40)
    cut = string.gsub(cut, '[^%w%p ]', '?')
    if #text > 40 then
        cut = cut .. '...'
    end
    return "'" .. cut .. "'"
end

-- Describe an expected list of names for an error reply: '1 (KEY)' or '0'.
local function expected(names)
    if #names == 0 then
        return '0'
    end
    return #names .. ' (' .. table.concat(names, ' ') .. ')'
end

local function check_arity(name, keys, args, key_names, arg_names)
    if #keys ~= #key_names then
        return redis.error_reply(format(
            'ERR wrong number of keys for %s: expected %s, got %d',
            name, expected(key_names), #keys))
    end
    if #args ~= #arg_names then
        return redis.error_reply(format(
            'ERR wrong number of arguments for %s: expected %s, got %d',
            name, expected(arg_names), #args))
    end
    return nil
end

-- Parse a decimal integer in 1..maximum; digits only, so '1.5', '1e3', ' 7'
-- and '-1' are all rejected rather than silently rounded.
local function parse_positive_int(text, arg_name, maximum)
    if #text > 16 or not match(text, '^[1-9]%d*$') then
        return nil, redis.error_reply(format(
            'ERR invalid %s %s: must be a positive integer', arg_name, quote(text)))
    end
    local number = tonumber(text)
    if number > maximum then
        return nil, redis.error_reply(format(
            'ERR invalid %s %s: must be at most %d', arg_name, quote(text), maximum))
    end
    return number, nil
end

local function check_token(token)
    if #token == 0 then
        return redis.error_reply('ERR invalid TOKEN: must not be empty')
    end
    if #token > MAX_TOKEN_BYTES then
        return redis.error_reply(format(
            'ERR invalid TOKEN: must be at most %d bytes, got %d',
            MAX_TOKEN_BYTES, #token))
    end
    if string.byte(token, 1) == 0 then
        return redis.error_reply(
            'ERR invalid TOKEN: must not start with a NUL byte (reserved for waiters)')
    end
    return nil
end

-- Clock and queries ---------------------------------------------------------

local function now_ms()
    local time = call('TIME')
    local micros = tonumber(time[2])
    return tonumber(time[1]) * 1000 + (micros - micros % 1000) / 1000
end

-- Score bounds as ZRANGEBYSCORE arguments; '(' makes a bound exclusive.
local function exclusive(score)
    return '(' .. format('%d', score)
end

local function inclusive(score)
    return format('%d', score)
end

local function count_live_slots(key, now)
    return call('ZCOUNT', key, exclusive(now), exclusive(LEASE_BASE))
end

local function count_live_waiters(key, now)
    return call('ZCOUNT', key, exclusive(LEASE_BASE + now), exclusive(ORDER_BASE))
end

-- Count the waiters' lease entries, live or ended: 0 means nobody is in line,
-- and the calls below skip every step that concerns waiters.
local function count_waiter_entries(key)
    return call('ZCOUNT', key, inclusive(LEASE_BASE), exclusive(ORDER_BASE))
end

-- Return the lease end of TOKEN's slot, or nil when TOKEN holds no slot.
-- Tokens never start with a NUL byte, so TOKEN never names a waiter entry.
local function slot_score(key, token)
    local score = call('ZSCORE', key, token)
    return score and tonumber(score)
end

-- Writes --------------------------------------------------------------------

-- Remove up to `limit` ended slots and, when `with_waiters` is set, up to
-- `limit` ended waiters. Return the numbers of slots and waiters removed.
local function remove_ended(key, now, limit, with_waiters)
    local slots = call('ZRANGEBYSCORE', key, '-inf', inclusive(now), 'LIMIT', 0, limit)
    if #slots > 0 then
        call('ZREM', key, unpack(slots))
    end
    if not with_waiters then
        return #slots, 0
    end

    local leases = call('ZRANGEBYSCORE', key, inclusive(LEASE_BASE),
        inclusive(LEASE_BASE + now), 'LIMIT', 0, limit)
    if #leases > 0 then
        local members = {}
        for _, lease_member in ipairs(leases) do
            local token = string.sub(lease_member, #WAITER_LEASE_PREFIX + 1)
            members[#members + 1] = lease_member
            members[#members + 1] = WAITER_ORDER_PREFIX .. token
        end
        call('ZREM', key, unpack(members))
    end
    return #slots, #leases
end

-- Make KEY live at least until `lease_end`, so that it never expires before
-- its longest lease and never lives without a TTL. `is_new` is true when KEY
-- held nothing before this call. The TTL is never shortened, so a key may
-- outlive its last lease, holding only ended entries that never count.
local function keep_key_until(key, lease_end, is_new)
    if is_new then
        call('PEXPIREAT', key, inclusive(lease_end))
        return
    end
    if call('PEXPIREAT', key, inclusive(lease_end), 'GT') == 1 then
        return
    end
    -- GT leaves the TTL alone when it already lasts longer, and also when the
    -- key has none (written outside this library): then its longest slot
    -- sets it.
    if call('PEXPIRETIME', key) == -1 then
        local last = call('ZREVRANGEBYSCORE', key, exclusive(LEASE_BASE), '-inf',
            'WITHSCORES', 'LIMIT', 0, 1)
        if #last > 0 then
            lease_end = math.max(lease_end, tonumber(last[2]))
        end
        call('PEXPIREAT', key, inclusive(lease_end))
    end
end

local function remove_waiter(key, token)
    return call('ZREM', key, WAITER_LEASE_PREFIX .. token, WAITER_ORDER_PREFIX .. token)
end

-- Wake the first live waiter in line: publish its token on the sharded
-- channel named like KEY (SPUBLISH, so on a cluster the message stays on the
-- shard that owns the key). Ended waiters met on the way are removed, at
-- most CLEANUP_BATCH of them. Only the first in line is woken, because it is
-- the only one that may take the slot. When it takes the slot and room is
-- left, its own call wakes the next.
local function wake_first_waiter(key, now)
    for _ = 1, CLEANUP_BATCH do
        local first = call('ZRANGEBYSCORE', key, inclusive(ORDER_BASE), '+inf', 'LIMIT', 0, 1)
        if #first == 0 then
            return
        end
        local token = string.sub(first[1], #WAITER_ORDER_PREFIX + 1)
        local lease = call('ZSCORE', key, WAITER_LEASE_PREFIX .. token)
        if lease and tonumber(lease) > LEASE_BASE + now then
            call('SPUBLISH', key, token)
            return
        end
        remove_waiter(key, token)
    end
end

-- Return how many live waiters stand ahead of TOKEN (all of them when TOKEN
-- is not in line), and whether TOKEN is in line. Ended waiters not removed
-- yet may be counted, which delays TOKEN but never grants a slot too many.
local function waiters_ahead(key, token, now)
    local live = count_live_waiters(key, now)
    local rank = call('ZRANK', key, WAITER_ORDER_PREFIX .. token)
    if not rank then
        return live, false
    end
    local below_order = call('ZCOUNT', key, '-inf', exclusive(ORDER_BASE))
    return math.min(rank - below_order, live), true
end

-- Return the ms until the soonest live slot ends, or -1 when none is held.
local function ms_until_next_end(key, now)
    local first = call('ZRANGEBYSCORE', key, exclusive(now), exclusive(LEASE_BASE),
        'WITHSCORES', 'LIMIT', 0, 1)
    if #first == 0 then
        return -1
    end
    return tonumber(first[2]) - now
end

-- Grant TOKEN a slot ending at `lease_end` if it may have one. `in_line`
-- is true when the caller waits in line, so a granted TOKEN leaves the line.
-- Return 1 when granted (or renewed) or 0 when not, the number of live
-- waiters ahead of TOKEN, and the live slots before the grant (nil when the
-- quick check below granted it without counting them).
local function try_acquire(key, max_slots, lease_end, token, now, in_line)
    local size = call('ZCARD', key)
    if size < max_slots then
        -- ZCARD counts every entry, slots and waiters, live or ended, so a
        -- key with fewer entries than MAX_SLOTS has room for TOKEN, and no
        -- waiter can be passed: the common case costs no further lookups.
        call('ZADD', key, inclusive(lease_end), token)
        if in_line and size > 0 then
            remove_waiter(key, token)
        end
        keep_key_until(key, lease_end, size == 0)
        return 1, 0, nil
    end

    -- The key looks full: count exactly, removing a batch of ended entries.
    local waiter_entries = count_waiter_entries(key)
    remove_ended(key, now, CLEANUP_BATCH, waiter_entries > 0)
    local score = slot_score(key, token)
    if score and score > now then
        call('ZADD', key, inclusive(lease_end), token)
        if waiter_entries > 0 then
            remove_waiter(key, token)
        end
        keep_key_until(key, lease_end, false)
        return 1, 0, nil
    end

    local ahead, queued = 0, false
    if waiter_entries > 0 then
        ahead, queued = waiters_ahead(key, token, now)
    end
    local live = count_live_slots(key, now)
    if live + ahead >= max_slots then
        return 0, ahead, live
    end
    call('ZADD', key, inclusive(lease_end), token)
    if queued then
        remove_waiter(key, token)
    end
    keep_key_until(key, lease_end, false)
    return 1, 0, live
end

-- Registered functions ------------------------------------------------------

local ONE_KEY = {'KEY'}
local NO_KEYS = {}
local NO_ARGS = {}
local ACQUIRE_ARGS = {'MAX_SLOTS', 'TIMEOUT_MS', 'TOKEN'}
local WAIT_ARGS = {'MAX_SLOTS', 'TIMEOUT_MS', 'TOKEN', 'WAIT_LEASE_MS'}
local RELEASE_ARGS = {'TOKEN'}
local EXTEND_ARGS = {'TOKEN', 'TIMEOUT_MS'}

--[[
runs_acquire: take a slot for TOKEN if KEY has a free one.
  KEYS[1]  the limit key (a sorted set)
  ARGV[1]  MAX_SLOTS   positive integer, at most 2^31-1
  ARGV[2]  TIMEOUT_MS  lease length in ms, positive, at most 2^40
  ARGV[3]  TOKEN       1 to 256 bytes, not starting with a NUL byte
Returns 1 when TOKEN holds a slot, 0 when every slot is taken or promised to
waiters already in line. A TOKEN that holds a live slot keeps it with a fresh
lease, so a retried acquire never takes a second slot.
Errors: ERR naming the bad argument; nothing is changed.
]]
local function runs_acquire(keys, args)
    local err = check_arity('runs_acquire', keys, args, ONE_KEY, ACQUIRE_ARGS)
    if err then return err end
    local key, token = keys[1], args[3]
    local max_slots, timeout_ms
    max_slots, err = parse_positive_int(args[1], 'MAX_SLOTS', MAX_SLOTS_LIMIT)
    if err then return err end
    timeout_ms, err = parse_positive_int(args[2], 'TIMEOUT_MS', MAX_TIMEOUT_MS)
    if err then return err end
    err = check_token(token)
    if err then return err end

    local now = now_ms()
    return (try_acquire(key, max_slots, now + timeout_ms, token, now, false))
end

--[[
runs_wait: take a slot for TOKEN, or keep its place in the line of waiters.
  KEYS[1]  the limit key
  ARGV[1]  MAX_SLOTS      as runs_acquire
  ARGV[2]  TIMEOUT_MS     lease of the slot when granted, ms
  ARGV[3]  TOKEN          as runs_acquire
  ARGV[4]  WAIT_LEASE_MS  how long the place in line lasts unless renewed by
                          calling again, ms, positive, at most 2^40
Waiters are served in the order they first called (server time, then token).
A waiter that stops calling loses its place when its wait lease ends. When a
slot comes free, the first live waiter is woken by a message on the sharded
channel named like KEY whose payload is its TOKEN.
Returns a flat array {GRANTED, AHEAD, NEXT_END_MS}: GRANTED is 1 when TOKEN
now holds a slot (then AHEAD and NEXT_END_MS are 0), else 0; AHEAD is the
number of live waiters before TOKEN; NEXT_END_MS is the time until the soonest
live slot's lease ends, or -1 when no slot is held.
Errors: ERR naming the bad argument; nothing is changed.
]]
local function runs_wait(keys, args)
    local err = check_arity('runs_wait', keys, args, ONE_KEY, WAIT_ARGS)
    if err then return err end
    local key, token = keys[1], args[3]
    local max_slots, timeout_ms, wait_lease_ms
    max_slots, err = parse_positive_int(args[1], 'MAX_SLOTS', MAX_SLOTS_LIMIT)
    if err then return err end
    timeout_ms, err = parse_positive_int(args[2], 'TIMEOUT_MS', MAX_TIMEOUT_MS)
    if err then return err end
    err = check_token(token)
    if err then return err end
    wait_lease_ms, err = parse_positive_int(args[4], 'WAIT_LEASE_MS', MAX_TIMEOUT_MS)
    if err then return err end

    local now = now_ms()
    local granted, ahead, live = try_acquire(key, max_slots, now + timeout_ms, token, now, true)
    if granted == 1 then
        if live and live + 1 < max_slots then
            wake_first_waiter(key, now)
        end
        return {1, 0, 0}
    end

    local wait_end = now + wait_lease_ms
    call('ZADD', key, inclusive(LEASE_BASE + wait_end), WAITER_LEASE_PREFIX .. token)
    call('ZADD', key, 'NX', inclusive(ORDER_BASE + now), WAITER_ORDER_PREFIX .. token)
    keep_key_until(key, wait_end, false)
    return {0, ahead, ms_until_next_end(key, now)}
end

--[[
runs_release: free TOKEN's slot, and take TOKEN out of the line of waiters.
  KEYS[1]  the limit key
  ARGV[1]  TOKEN
Returns 1 when TOKEN held a live slot, now freed; 0 when it held none or its
lease had already ended. When anything was removed, the first live waiter
on KEY is woken (see runs_wait).
Errors: ERR naming the bad argument; nothing is changed.
]]
local function runs_release(keys, args)
    local err = check_arity('runs_release', keys, args, ONE_KEY, RELEASE_ARGS)
    if err then return err end
    local key, token = keys[1], args[1]
    err = check_token(token)
    if err then return err end

    local now = now_ms()
    local score = slot_score(key, token)
    local removed = call('ZREM', key, token,
        WAITER_LEASE_PREFIX .. token, WAITER_ORDER_PREFIX .. token)
    if removed > 0 then
        wake_first_waiter(key, now)
    end
    if score and score > now then
        return 1
    end
    return 0
end

--[[
runs_extend: give TOKEN's live lease a new end, TIMEOUT_MS from now.
  KEYS[1]  the limit key
  ARGV[1]  TOKEN
  ARGV[2]  TIMEOUT_MS  ms, positive, at most 2^40; may be shorter than before
Returns 1 when the lease now ends TIMEOUT_MS from now; 0 when TOKEN held no
live slot. An ended lease is never revived.
Errors: ERR naming the bad argument; nothing is changed.
]]
local function runs_extend(keys, args)
    local err = check_arity('runs_extend', keys, args, ONE_KEY, EXTEND_ARGS)
    if err then return err end
    local key, token = keys[1], args[1]
    err = check_token(token)
    if err then return err end
    local timeout_ms
    timeout_ms, err = parse_positive_int(args[2], 'TIMEOUT_MS', MAX_TIMEOUT_MS)
    if err then return err end

    local now = now_ms()
    local score = slot_score(key, token)
    if not (score and score > now) then
        return 0
    end
    local lease_end = now + timeout_ms
    call('ZADD', key, 'XX', inclusive(lease_end), token)
    keep_key_until(key, lease_end, false)
    return 1
end

--[[
runs_count: the number of live slots at KEY. Read-only (FCALL_RO, replicas).
  KEYS[1]  the limit key
Returns an integer.
]]
local function runs_count(keys, args)
    local err = check_arity('runs_count', keys, args, ONE_KEY, NO_ARGS)
    if err then return err end
    return count_live_slots(keys[1], now_ms())
end

--[[
runs_holders: the live slots at KEY, soonest to end first. Read-only.
  KEYS[1]  the limit key
  ARGV[1]  LIMIT  optional, positive integer: return at most this many slots
Returns a flat array {TOKEN, MS_LEFT, TOKEN, MS_LEFT, ...}. Without LIMIT the
reply grows with the number of live slots.
]]
local function runs_holders(keys, args)
    if #keys ~= 1 then
        return check_arity('runs_holders', keys, NO_ARGS, ONE_KEY, NO_ARGS)
    end
    if #args > 1 then
        return redis.error_reply(format(
            'ERR wrong number of arguments for runs_holders: expected 0 or 1 (LIMIT), got %d',
            #args))
    end
    local err
    local key = keys[1]
    local limit = -1
    if #args == 1 then
        limit, err = parse_positive_int(args[1], 'LIMIT', MAX_SLOTS_LIMIT)
        if err then return err end
    end

    local now = now_ms()
    local live = call('ZRANGEBYSCORE', key, exclusive(now), exclusive(LEASE_BASE),
        'WITHSCORES', 'LIMIT', 0, limit)
    local reply = {}
    for i = 1, #live, 2 do
        reply[#reply + 1] = live[i]
        reply[#reply + 1] = tonumber(live[i + 1]) - now
    end
    return reply
end

--[[
runs_reap: remove ended slots and ended waiters from KEY, one batch a call.
  KEYS[1]  the limit key
Returns the number of ended slots removed: at most 250, so call again while
the reply is 250 to remove more. When any entry was removed, the first live
waiter on KEY is woken (see runs_wait).
]]
local function runs_reap(keys, args)
    local err = check_arity('runs_reap', keys, args, ONE_KEY, NO_ARGS)
    if err then return err end
    local key = keys[1]

    local now = now_ms()
    local with_waiters = count_waiter_entries(key) > 0
    local slots, waiters = remove_ended(key, now, REAP_BATCH, with_waiters)
    if slots + waiters > 0 then
        wake_first_waiter(key, now)
    end
    return slots
end

--[[
runs_version: the version of this library, 'MAJOR.MINOR.PATCH'. Read-only.
]]
local function runs_version(keys, args)
    local err = check_arity('runs_version', keys, args, NO_KEYS, NO_ARGS)
    if err then return err end
    return VERSION
end

-- Wrap a library function so that it binds `call` before it runs.
local function registered(callback)
    return function(keys, args)
        call = redis.call
        format = string.format
        match = string.match
        return callback(keys, args)
    end
end

redis.register_function{function_name = 'runs_acquire', callback = registered(runs_acquire)}
redis.register_function{function_name = 'runs_wait', callback = registered(runs_wait)}
-- Giving slots back must work when Redis is at maxmemory: allow-oom.
redis.register_function{function_name = 'runs_release', callback = registered(runs_release),
    flags = {'allow-oom'}}
redis.register_function{function_name = 'runs_extend', callback = registered(runs_extend),
    flags = {'allow-oom'}}
redis.register_function{function_name = 'runs_reap', callback = registered(runs_reap),
    flags = {'allow-oom'}}
redis.register_function{function_name = 'runs_count', callback = registered(runs_count),
    flags = {'no-writes'}}
redis.register_function{function_name = 'runs_holders', callback = registered(runs_holders),
    flags = {'no-writes'}}
redis.register_function{function_name = 'runs_version', callback = registered(runs_version),
    flags = {'no-writes'}}
