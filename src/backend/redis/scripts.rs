//! The Lua scripts of the protocol. Each runs atomically on the server in one round trip.
//!
//! Every script gets the Redis keys of one parking key (`KEYS`, all in one cluster slot thanks to
//! the hash tag) and its arguments as strings (`ARGV`). Scripts are loaded once when the backend
//! is built and run with `EVALSHA`; a server that lost its script cache (restarted, flushed)
//! answers `NOSCRIPT`, and the script is loaded again.

use fred::{
    clients::Client,
    error::Error,
    interfaces::LuaInterface,
    types::{MultipleKeys, Value},
};

/// Defines `next_fence(fence_key, ttl_ms)`: increments the key's fencing counter and returns it as
/// a string.
///
/// A missing counter starts at the server's clock in microseconds, not at 0: a counter that
/// expired and was created again still only grows, so a fence number never repeats and a stale
/// leader never passes for a later one, however short the counter's TTL.
macro_rules! next_fence_lua {
    () => {
        r"
local function next_fence(fence_key, ttl_ms)
  if redis.call('EXISTS', fence_key) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', fence_key, now[1] .. string.rep('0', 6 - #now[2]) .. now[2])
  end
  redis.call('INCR', fence_key)
  redis.call('PEXPIRE', fence_key, ttl_ms)
  return redis.call('GET', fence_key)
end
"
    };
}

/// KEYS: resp, lock, fence. ARGV: lookup ('1' or '0'), lease ms, nonce, fence ttl ms.
/// Returns `{'fresh', value, value pttl}`, `{'acquired', fence, token}` or `{'held', lock pttl}`.
const ACQUIRE: &str = concat!(
    next_fence_lua!(),
    r"
if ARGV[1] == '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return {'fresh', value, redis.call('PTTL', KEYS[1])} end
end
local pttl = redis.call('PTTL', KEYS[2])
if pttl ~= -2 then return {'held', pttl} end
local fence = next_fence(KEYS[3], ARGV[4])
local token = fence .. ':' .. ARGV[3]
redis.call('SET', KEYS[2], token, 'PX', ARGV[2])
return {'acquired', fence, token}
"
);

/// KEYS: resp, lock. ARGV: lookup ('1' or '0'). Returns `{'fresh', value, value pttl}` or
/// `{'held', lock pttl}` (-2: no lock).
const PEEK: &str = r"
if ARGV[1] == '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return {'fresh', value, redis.call('PTTL', KEYS[1])} end
end
return {'held', redis.call('PTTL', KEYS[2])}
";

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

/// KEYS: lock. ARGV: `:<nonce>`. Deletes the lock if an acquisition with this nonce took it.
const ABANDON: &str = r"
local lock = redis.call('GET', KEYS[1])
if not lock or string.sub(lock, -#ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// KEYS: resp, lock, fence. ARGV: token, fence, value, ttl ms. Returns 1 if stored, else 0.
///
/// Stores if the caller still holds the lock, or if nobody holds it and nobody acquired or
/// invalidated the key since the caller did (the fence is still the caller's).
const COMPLETE: &str = r"
local lock = redis.call('GET', KEYS[2])
local mine = lock == ARGV[1]
if not mine and (lock or redis.call('GET', KEYS[3]) ~= ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
if mine then redis.call('DEL', KEYS[2]) end
return 1
";

/// KEYS: resp, lock, fence. ARGV: fence ttl ms. Forgets the value and the lock and moves the
/// fence on, so the current leader's `complete` is refused.
const INVALIDATE: &str = concat!(
    next_fence_lua!(),
    r"
redis.call('DEL', KEYS[1], KEYS[2])
next_fence(KEYS[3], ARGV[1])
return 1
"
);

/// One loaded script: its source, to load it again after `NOSCRIPT`, and its SHA-1.
#[derive(Debug)]
pub(super) struct Script {
    lua: &'static str,
    sha: String,
}

impl Script {
    async fn load(client: &Client, lua: &'static str) -> Result<Self, Error> {
        let sha = client.script_load(lua).await?;
        Ok(Self { lua, sha })
    }

    /// Runs the script, loading it again if the server forgot it.
    pub(super) async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, Error> {
        let keys = MultipleKeys::from(keys);
        match client
            .evalsha(self.sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                let _: String = client.script_load(self.lua).await?;
                client.evalsha(self.sha.as_str(), keys, args).await
            }
            result => result,
        }
    }
}

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
    pub(super) async fn load(client: &Client) -> Result<Self, Error> {
        Ok(Self {
            acquire: Script::load(client, ACQUIRE).await?,
            peek: Script::load(client, PEEK).await?,
            renew: Script::load(client, RENEW).await?,
            release: Script::load(client, RELEASE).await?,
            complete: Script::load(client, COMPLETE).await?,
            invalidate: Script::load(client, INVALIDATE).await?,
            abandon: Script::load(client, ABANDON).await?,
        })
    }
}
