//! The Lua scripts of the protocol. Each runs atomically on the server in one round trip.
//!
//! Every script gets the Redis keys of one parking key (`KEYS`, all in one cluster slot thanks to
//! the hash tag) and its arguments as strings (`ARGV`). Scripts run with `EVALSHA` (their SHA-1 is
//! computed here, so a backend needs no server to be built); a server that does not have a script
//! yet (new, restarted, flushed) answers `NOSCRIPT`, and the script is loaded then.

use fred::{
    clients::Client,
    error::{Error, ErrorKind},
    interfaces::LuaInterface,
    types::{MultipleKeys, Value},
};

/// Defines `next_fence(fence_key, ttl_ms, nonce)`: moves the key's fencing counter on and returns
/// the new number as a string. The key holds `<number>:<nonce>`: the number and who took it.
///
/// A missing counter starts at the server's clock in microseconds, not at 0: a counter that
/// expired and was created again still only grows, so a fence number never repeats and a stale
/// leader never passes for a later one, however short the counter's TTL. A replica promoted
/// before it received the last increment hands the same number out again, but not the same
/// nonce: the counter's owner, not only its number, decides whether a leader without its lock
/// may still store (see `COMPLETE`). Numbers stay below 2^53, exact in Lua's doubles.
macro_rules! next_fence_lua {
    () => {
        r"
local function next_fence(fence_key, ttl_ms, nonce)
  local n = tonumber(string.match(redis.call('GET', fence_key) or '', '^(%d+)'))
  if not n then
    local now = redis.call('TIME')
    n = tonumber(now[1] .. string.rep('0', 6 - #now[2]) .. now[2])
  end
  local fence = string.format('%.0f', n + 1)
  redis.call('SET', fence_key, fence .. ':' .. nonce, 'PX', ttl_ms)
  return fence
end
"
    };
}

/// Defines `stored(resp_key, gen_key)`: the value stored under `resp_key` (`<generation> <entry>`,
/// returned whole: the client drops the prefix without a copy) and where its entry starts, or
/// `false` when there is none or it was stored before the URI's last invalidation; and the URI's
/// current generation.
macro_rules! stored_lua {
    () => {
        r"
local function stored(resp_key, gen_key)
  local gen = redis.call('GET', gen_key) or '0'
  local value = redis.call('GET', resp_key)
  if not value then return false, gen end
  local head = gen .. ' '
  if string.sub(value, 1, #head) ~= head then return false, gen end
  return value, gen, #head + 1
end
"
    };
}

/// KEYS: resp, lock, fence, gen. ARGV: lookup ('1' or '0'), lease ms, nonce, fence ttl ms, now
/// (µs). Returns `{'fresh', entry, entry pttl}`, `{'acquired', fence, token[, stale entry]}` or
/// `{'held', lock pttl, holder's fence[, stale entry]}`. An acquisition run twice (the client
/// sends a command again when its connection dropped before the reply) finds the lock its nonce
/// took and is answered `acquired` again, not `held` by itself.
const ACQUIRE: &str = concat!(
    next_fence_lua!(),
    stored_lua!(),
    r"
local value, gen, at = stored(KEYS[1], KEYS[4])
if value and ARGV[1] == '1' then
  local _, fresh = string.match(value, '^TP2 (%d+) (%d+) ', at)
  if fresh and tonumber(fresh) > tonumber(ARGV[5]) then
    return {'fresh', value, redis.call('PTTL', KEYS[1])}
  end
end
local lock = redis.call('GET', KEYS[2])
if lock and string.find(lock, ':' .. ARGV[3] .. ':', 1, true) then
  -- This acquisition, sent again after its connection dropped before the reply: it holds the lock.
  local fence = string.match(lock, '^(%d+):')
  if value then return {'acquired', fence, lock, value} end
  return {'acquired', fence, lock}
end
local pttl = redis.call('PTTL', KEYS[2])
if pttl ~= -2 then
  local holder = string.match(lock or '', '^(%d+):') or '0'
  if value then return {'held', pttl, holder, value} end
  return {'held', pttl, holder}
end
local fence = next_fence(KEYS[3], ARGV[4], ARGV[3])
local token = fence .. ':' .. ARGV[3] .. ':' .. gen
redis.call('SET', KEYS[2], token, 'PX', ARGV[2])
if value then return {'acquired', fence, token, value} end
return {'acquired', fence, token}
"
);

/// KEYS: resp, lock, gen. ARGV: lookup ('1' or '0'), now (µs), awaited fence ('0': the lock
/// holder's). Returns `{'stored', entry}` when the entry is fresh (and looked up) or was written
/// by the awaited leader or a later one, `{'held', lock pttl, awaited fence}` or `{'free'}`.
const PEEK: &str = concat!(
    stored_lua!(),
    r"
local value, _, at = stored(KEYS[1], KEYS[3])
local lock = redis.call('GET', KEYS[2])
local awaited = ARGV[3]
if awaited == '0' and lock then awaited = string.match(lock, '^(%d+):') or '0' end
if value then
  local fence, fresh = string.match(value, '^TP2 (%d+) (%d+) ', at)
  if fence and ((ARGV[1] == '1' and tonumber(fresh) > tonumber(ARGV[2]))
      or (awaited ~= '0' and tonumber(fence) >= tonumber(awaited))) then
    return {'stored', value}
  end
end
if lock then return {'held', redis.call('PTTL', KEYS[2]), awaited} end
return {'free'}
"
);

/// KEYS: lock, fence. ARGV: token, lease ms, fence ttl ms. Returns 1 if renewed, else 0.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
";

/// KEYS: lock. ARGV: token. Returns 1 if released, else 0.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// KEYS: lock. ARGV: `:<nonce>:`. Deletes the lock if an acquisition with this nonce took it.
const ABANDON: &str = r"
local lock = redis.call('GET', KEYS[1])
if not lock or not string.find(lock, ARGV[1], 1, true) then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// KEYS: resp, lock, fence, gen. ARGV: token, `<fence>:<nonce>` (the token's head), entry, keep
/// ms, the URI's generation when the lease was taken. Returns 1 if stored, else 0.
///
/// Stores if the URI was not invalidated since the lease was taken, and the caller still holds
/// the lock, or nobody holds it and nobody acquired the key since the caller did (the fence
/// counter still names the caller: its number and its nonce, so a number handed out twice after
/// a failover lost an increment does not let the older leader store). The caller's lock goes either way.
const COMPLETE: &str = r"
local lock = redis.call('GET', KEYS[2])
local mine = lock == ARGV[1]
if mine then redis.call('DEL', KEYS[2]) end
local gen = redis.call('GET', KEYS[4]) or '0'
if gen ~= ARGV[5] then return 0 end
if not mine and (lock or redis.call('GET', KEYS[3]) ~= ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], gen .. ' ' .. ARGV[3], 'PX', ARGV[4])
return 1
";

/// KEYS: gen. ARGV: gen ttl ms. Moves the URI's generation on: every entry stored before is
/// ignored from now on, and every leader that took its lease before stores nothing.
///
/// A missing generation starts at the server's clock, like a fence, so it never repeats.
const INVALIDATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[1], now[1] .. string.rep('0', 6 - #now[2]) .. now[2])
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// One loaded script: its source, to load it again after `NOSCRIPT`, and its SHA-1.
#[derive(Debug)]
pub(super) struct Script {
    lua: &'static str,
    sha: String,
}

impl Script {
    fn new(lua: &'static str) -> Self {
        Self {
            lua,
            sha: fred::util::sha1_hash(lua),
        }
    }

    /// Runs the script, loading it again if the server forgot it, and again a little later while
    /// its slot is being migrated (see [`migrating`]).
    pub(super) async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, Error> {
        let keys = MultipleKeys::from(keys);
        let mut retries = MIGRATING_RETRIES;
        loop {
            let result = match client
                .evalsha(self.sha.as_str(), keys.clone(), args.clone())
                .await
            {
                Err(error) if error.details().starts_with("NOSCRIPT") => {
                    // On every primary of a cluster (the key's node may be a new one), on the one
                    // server otherwise.
                    let _: String = client.script_load_cluster(self.lua).await?;
                    client
                        .evalsha(self.sha.as_str(), keys.clone(), args.clone())
                        .await
                }
                result => result,
            };
            match result {
                Err(error) if retries > 0 && migrating(&error) => {
                    retries -= 1;
                    tokio::time::sleep(MIGRATING_PAUSE).await;
                }
                result => return result,
            }
        }
    }
}

/// Whether a script failed because its slot is being migrated to another node: its keys are split
/// between the two (`TRYAGAIN`), or the client followed `ASK` redirections until it gave up (fred
/// 10.1 sends the command back to the old node after `ASKING` the new one). Either ends when the
/// migration does.
fn migrating(error: &Error) -> bool {
    error.details().starts_with("TRYAGAIN")
        || (*error.kind() == ErrorKind::Routing && error.details().contains("redirections"))
}

/// How often a script that failed because its slot is being migrated runs again, and how long
/// after. A slot is migrated in milliseconds per batch of keys; past that, the error reaches the
/// caller, which serves without the fleet as for any Redis failure.
const MIGRATING_RETRIES: u32 = 10;
const MIGRATING_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Every script of the protocol, loaded.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) acquire: Script,
    pub(super) peek: Script,
    pub(super) renew: Script,
    pub(super) release: Script,
    pub(super) complete: Script,
    pub(super) invalidate: Script,
    pub(super) abandon: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            acquire: Script::new(ACQUIRE),
            peek: Script::new(PEEK),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            complete: Script::new(COMPLETE),
            invalidate: Script::new(INVALIDATE),
            abandon: Script::new(ABANDON),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_s_sha_is_redis_s() {
        // `SCRIPT LOAD "return 1"` answers this.
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn scripts_read_entry_heads_as_the_stamp_writes_them() {
        for script in [ACQUIRE, PEEK] {
            assert!(script.contains(crate::backend::LUA_HEAD_PATTERN));
        }
    }
}
