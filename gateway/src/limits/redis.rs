//! The Redis limit store, shared by gateway replicas.
//!
//! A call's counters are checked and charged by ONE Lua script, which Redis runs atomically:
//! no other replica's charge can come between the check and the charge. The script reads the
//! time with Redis's `TIME`, so replicas whose clocks disagree still agree on buckets and quota
//! windows. Every key it writes gets a `PEXPIRE`: a rate bucket lives until it has drained, a
//! quota until a minute after its window ends.
//!
//! Keys: a rate bucket is a hash `{u: used, t: microseconds}`; a quota is a hash
//! `{w: window start in seconds, u: used}` that starts again at zero when the window changes.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Semaphore;

use super::{Adjustment, Bucket, BucketKind, StoreAnswer, StoreError};
use crate::secret::Secret;
use crate::warning_throttle::WarningThrottle;
use gatehouse_schema::limits::QuotaPeriod;

/// Calendar windows in UTC (the same arithmetic as [`QuotaPeriod::window`]; civil dates from day
/// numbers after Howard Hinnant's algorithms) and the reading and writing of the counters, shared
/// by the scripts.
const WINDOW_LUA: &str = r#"
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end
local function window(period, now_s)
  local day = 86400
  if period == 'h' then
    local s = now_s - now_s % 3600
    return s, s + 3600
  elseif period == 'd' then
    local s = now_s - now_s % day
    return s, s + day
  elseif period == 'w' then
    local days = math.floor(now_s / day)
    local monday = days - (days + 3) % 7
    return monday * day, (monday + 7) * day
  end
  local y, m = civil_from_days(math.floor(now_s / day))
  if period == 'm' then
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    return days_from_civil(y, m, 1) * day, days_from_civil(ny, nm, 1) * day
  end
  return days_from_civil(y, 1, 1) * day, days_from_civil(y + 1, 1, 1) * day
end
local function now_us()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function drained(key, cap, now)
  local state = redis.call('HMGET', key, 'u', 't')
  local used = tonumber(state[1]) or 0
  local at = tonumber(state[2]) or now
  local elapsed = now - at
  if elapsed < 0 then elapsed = 0 end
  used = used - elapsed * cap / 60000000
  if used < 0 then used = 0 end
  return used
end
local function quota_used(key, s)
  local state = redis.call('HMGET', key, 'w', 'u')
  if tonumber(state[1]) == s then return tonumber(state[2]) or 0 end
  return 0
end
local function store_quota(key, s, e, used, now)
  redis.call('HSET', key, 'w', string.format('%.0f', s), 'u', string.format('%.0f', used))
  redis.call('PEXPIRE', key, math.max(1000, math.floor((e * 1000000 - now) / 1000) + 60000))
end
local function store_rate(key, used, cap, now)
  if used <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'u', string.format('%.6f', used), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', key, math.ceil(used * 60000 / cap) + 1000)
end
"#;

/// Checks and charges. KEYS: the counters. ARGV[1]: the time in microseconds, or empty for
/// Redis's own; then per key: kind (`r` rate, `q` quota), capacity, cost, period (`h`, `d`, `w`,
/// `m`, `y`; `-` for a rate). Answers `{1, remaining, window start, …}` when everything was
/// charged, `{0, refusing key's position, wait in ms}` when nothing was.
const ADMIT_LUA: &str = r#"
local now = now_us()
local now_s = math.floor(now / 1000000)
local used, starts, ends = {}, {}, {}
local quota_refusal, quota_wait = 0, 0
local rate_refusal, rate_wait = 0, 0
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local kind, cap, cost = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  if kind == 'r' then
    local u = drained(KEYS[i], cap, now)
    used[i] = u
    local excess = u + cost - cap
    if excess > 0 then
      local wait = math.ceil(excess * 60000 / cap)
      if rate_refusal == 0 or wait > rate_wait then
        rate_refusal, rate_wait = i, wait
      end
    end
  else
    local s, e = window(ARGV[b + 3], now_s)
    starts[i], ends[i] = s, e
    local u = quota_used(KEYS[i], s)
    used[i] = u
    if u + cost > cap then
      local wait = math.floor((e * 1000000 - now) / 1000)
      if quota_refusal == 0 or wait > quota_wait then
        quota_refusal, quota_wait = i, wait
      end
    end
  end
end
if quota_refusal > 0 then return {0, quota_refusal, math.max(quota_wait, rate_wait)} end
if rate_refusal > 0 then return {0, rate_refusal, rate_wait} end
local out = {1}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local kind, cap, cost = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local u = used[i] + cost
  if kind == 'r' then
    store_rate(KEYS[i], u, cap, now)
    out[#out + 1] = math.max(0, math.floor(cap - u))
    out[#out + 1] = 0
  else
    store_quota(KEYS[i], starts[i], ends[i], u, now)
    out[#out + 1] = math.max(0, cap - u)
    out[#out + 1] = starts[i]
  end
end
return out
"#;

/// Charges counters for work already done, refusing none. KEYS and ARGV as [`ADMIT_LUA`]'s: a
/// rate drains first, a quota is charged in its window of now (a new one if it has begun).
const CHARGE_LUA: &str = r#"
local now = now_us()
local now_s = math.floor(now / 1000000)
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local kind, cap, cost = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  if kind == 'r' then
    store_rate(KEYS[i], drained(KEYS[i], cap, now) + cost, cap, now)
  else
    local s, e = window(ARGV[b + 3], now_s)
    store_quota(KEYS[i], s, e, quota_used(KEYS[i], s) + cost, now)
  end
end
return 1
"#;

/// Corrects counters after calls finished. KEYS: the counters. ARGV[1]: the time in
/// microseconds, or empty for Redis's own; then per key: kind (`r`, `q`), capacity, delta,
/// quota window start, period (as [`ADMIT_LUA`]'s). A rate drains first and never goes below
/// zero. A quota is corrected in the window that was charged while it lasts; once another has
/// begun, tokens used beyond the reservation are charged to the window of now and a refund is
/// dropped (as `LocalStore::adjust`).
const ADJUST_LUA: &str = r#"
local now = now_us()
local now_s = math.floor(now / 1000000)
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 5
  local kind, cap, delta = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  if kind == 'r' then
    local u = drained(KEYS[i], cap, now) + delta
    store_rate(KEYS[i], u, cap, now)
  else
    local charged = tonumber(ARGV[b + 3])
    local s, e = window(ARGV[b + 4], now_s)
    local state = redis.call('HMGET', KEYS[i], 'w', 'u')
    if s == charged and state[1] and tonumber(state[1]) == charged then
      local u = (tonumber(state[2]) or 0) + delta
      if u < 0 then u = 0 end
      redis.call('HSET', KEYS[i], 'u', string.format('%.0f', u))
    elseif delta > 0 and s >= charged then
      store_quota(KEYS[i], s, e, quota_used(KEYS[i], s) + delta, now)
    end
  end
end
return 1
"#;

/// How long an answer of Redis is still waited for after the caller stopped waiting for it.
const LATE_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// The most late answers waited for at once. A hung Redis makes every call time out; each one's
/// wait holds a task (a few KB) for up to [`LATE_ANSWER_WAIT`], so at thousands of calls a second
/// they are bounded: past this many, a late charge is not waited for, and may stand.
const MAX_LATE_WAITS: usize = 10_000;

/// How often a late charge that cannot be waited for is logged.
const LATE_WAIT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Counters in Redis, through one multiplexed connection that reconnects by itself.
#[derive(Clone)]
pub(crate) struct RedisStore {
    connection: ConnectionManager,
    admit: Arc<redis::Script>,
    charge: Arc<redis::Script>,
    adjust: Arc<redis::Script>,
    timeout: Duration,
    /// Room for the late answers waited for at once (see [`MAX_LATE_WAITS`]).
    late_waits: Arc<Semaphore>,
    warnings: Arc<WarningThrottle>,
}

impl RedisStore {
    /// A store at `url`; connects on first use, and again whenever the connection breaks.
    pub(crate) fn new(url: &Secret<String>, timeout: Duration) -> Result<RedisStore, String> {
        RedisStore::waiting_late_for_at_most(url, timeout, MAX_LATE_WAITS)
    }

    /// A store that waits for at most `late_waits` late answers at once.
    fn waiting_late_for_at_most(
        url: &Secret<String>,
        timeout: Duration,
        late_waits: usize,
    ) -> Result<RedisStore, String> {
        // Answers are waited for longer than callers wait (`timeout`), so that a charge Redis
        // answers late can be given back (see `admit`).
        let connection =
            crate::redis_connection::connect_lazily(url, timeout, Some(LATE_ANSWER_WAIT))?;
        Ok(RedisStore {
            connection,
            admit: Arc::new(redis::Script::new(&format!("{WINDOW_LUA}{ADMIT_LUA}"))),
            charge: Arc::new(redis::Script::new(&format!("{WINDOW_LUA}{CHARGE_LUA}"))),
            adjust: Arc::new(redis::Script::new(&format!("{WINDOW_LUA}{ADJUST_LUA}"))),
            timeout,
            late_waits: Arc::new(Semaphore::new(late_waits)),
            warnings: Arc::new(WarningThrottle::new(LATE_WAIT_WARNING_INTERVAL)),
        })
    }

    /// Checks every bucket and charges them all, or none. `now_us` replaces Redis's clock
    /// (tests only pass one).
    ///
    /// An answer that does not come within the store's timeout is an error, but the script was
    /// sent and may still run: its answer is then waited for on a task of its own, and if it
    /// charged the buckets after all, that task gives the charge back (the caller has refused
    /// the call, or admitted it without a reservation to settle), so that a slow Redis does not
    /// use up quotas with calls that never ran or were never counted. At most [`MAX_LATE_WAITS`]
    /// such answers are waited for at once.
    pub(crate) async fn admit(
        &self,
        buckets: &[Bucket],
        now_us: Option<i64>,
    ) -> Result<StoreAnswer, StoreError> {
        let mut args = vec![now_us.map_or_else(String::new, |t| t.to_string())];
        for bucket in buckets {
            let (kind, period) = code(bucket.kind);
            args.extend([
                kind.to_owned(),
                bucket.kind.capacity().to_string(),
                bucket.cost.to_string(),
                period.to_owned(),
            ]);
        }
        let keys: Vec<String> = buckets.iter().map(|bucket| bucket.key.clone()).collect();
        let script = Arc::clone(&self.admit);
        let mut connection = self.connection.clone();
        // An owned future: awaited here, and handed to a task of its own only if it times out.
        let mut reply = Box::pin(async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            invocation.invoke_async::<Vec<i64>>(&mut connection).await
        });
        match tokio::time::timeout(self.timeout, &mut reply).await {
            Ok(answer) => {
                let answer = answer.map_err(|e| StoreError::Redis(e.to_string()))?;
                parse_admit(&answer, buckets.len())
            }
            Err(_) => {
                let Ok(room) = Arc::clone(&self.late_waits).try_acquire_owned() else {
                    if self.warnings.should_warn() {
                        tracing::warn!(
                            waits = MAX_LATE_WAITS,
                            "usage limits: Redis is answering late for many calls at once; a charge it makes after the gateway stopped waiting is not given back"
                        );
                    }
                    return Err(StoreError::Timeout(millis(self.timeout)));
                };
                let charges: Vec<(String, BucketKind, u64)> = buckets
                    .iter()
                    .map(|bucket| (bucket.key.clone(), bucket.kind, bucket.cost))
                    .collect();
                let store = self.clone();
                tokio::spawn(async move {
                    let _room = room;
                    let Ok(answer) = reply.await else {
                        return;
                    };
                    let Ok(StoreAnswer::Admitted(levels)) = parse_admit(&answer, charges.len())
                    else {
                        return;
                    };
                    let refunds: Vec<Adjustment> = charges
                        .into_iter()
                        .zip(levels)
                        .map(|((key, kind, cost), (_, window_start))| Adjustment {
                            key,
                            kind,
                            delta: -i64::try_from(cost).unwrap_or(i64::MAX),
                            window_start,
                        })
                        .collect();
                    if let Err(error) = store.adjust(&refunds, now_us).await {
                        tracing::warn!(%error, "usage limits: could not give back a charge that Redis made after the gateway stopped waiting for it");
                    }
                });
                Err(StoreError::Timeout(millis(self.timeout)))
            }
        }
    }

    /// Charges every bucket its cost, refusing none (see [`CHARGE_LUA`]). `now_us` replaces
    /// Redis's clock (tests only pass one).
    pub(crate) async fn charge(
        &self,
        buckets: &[Bucket],
        now_us: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut invocation = self.charge.prepare_invoke();
        invocation.arg(now_us.map_or_else(String::new, |t| t.to_string()));
        for bucket in buckets {
            let (kind, period) = code(bucket.kind);
            invocation
                .key(&bucket.key)
                .arg(kind)
                .arg(bucket.kind.capacity())
                .arg(bucket.cost)
                .arg(period);
        }
        self.run(&invocation).await
    }

    /// Runs a script that answers 1, within the store's timeout.
    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| StoreError::Timeout(millis(self.timeout)))?
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        Ok(())
    }

    /// Applies corrections. `now_us` replaces Redis's clock (tests only pass one).
    pub(crate) async fn adjust(
        &self,
        adjustments: &[Adjustment],
        now_us: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut invocation = self.adjust.prepare_invoke();
        invocation.arg(now_us.map_or_else(String::new, |t| t.to_string()));
        for adjustment in adjustments {
            invocation.key(&adjustment.key);
            let (kind, period) = code(adjustment.kind);
            invocation
                .arg(kind)
                .arg(adjustment.kind.capacity())
                .arg(adjustment.delta)
                .arg(adjustment.window_start)
                .arg(period);
        }
        self.run(&invocation).await
    }
}

/// The script's codes for a bucket kind: kind and period.
fn code(kind: BucketKind) -> (&'static str, &'static str) {
    match kind {
        BucketKind::Requests { .. } | BucketKind::Tokens { .. } => ("r", "-"),
        BucketKind::Quota { period, .. } => (
            "q",
            match period {
                QuotaPeriod::Hourly => "h",
                QuotaPeriod::Daily => "d",
                QuotaPeriod::Weekly => "w",
                QuotaPeriod::Monthly => "m",
                QuotaPeriod::Yearly => "y",
            },
        ),
    }
}

fn parse_admit(answer: &[i64], buckets: usize) -> Result<StoreAnswer, StoreError> {
    let unexpected = || StoreError::Redis("unexpected answer from the limit script".to_owned());
    match answer {
        [1, levels @ ..] if levels.len() == 2 * buckets => Ok(StoreAnswer::Admitted(
            levels
                .chunks_exact(2)
                .map(|pair| (u64::try_from(pair[0]).unwrap_or(0), pair[1]))
                .collect(),
        )),
        [0, position, wait] if *position >= 1 && (*position as usize) <= buckets => {
            Ok(StoreAnswer::Refused {
                bucket: *position as usize - 1,
                wait_ms: u64::try_from(*wait).unwrap_or(0),
            })
        }
        _ => Err(unexpected()),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay to the tests' Redis (127.0.0.1:6379) that holds its replies back while `hold` is
    /// set.
    async fn holding_relay(hold: Arc<std::sync::atomic::AtomicBool>) -> Secret<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let hold = Arc::clone(&hold);
                tokio::spawn(async move {
                    let redis = tokio::net::TcpStream::connect("127.0.0.1:6379")
                        .await
                        .unwrap();
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_redis, mut to_redis) = redis.into_split();
                    tokio::spawn(
                        async move { tokio::io::copy(&mut from_client, &mut to_redis).await },
                    );
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = from_redis.read(&mut buffer).await {
                        while hold.load(std::sync::atomic::Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if to_client.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Secret::new(url)
    }

    #[tokio::test]
    async fn a_hung_redis_holds_at_most_the_late_waits_allowed() {
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let url = holding_relay(Arc::clone(&hold)).await;
        let store =
            RedisStore::waiting_late_for_at_most(&url, Duration::from_millis(200), 2).unwrap();
        let key = format!("gatehouse-test:late-waits:{}", uuid::Uuid::new_v4());
        let bucket = Bucket {
            key: key.clone(),
            kind: BucketKind::Requests { per_minute: 1000 },
            cost: 1,
            rule: 0,
        };
        let admit = || store.admit(std::slice::from_ref(&bucket), None);
        // Connected, and the script loaded, while Redis answers.
        assert!(matches!(admit().await, Ok(StoreAnswer::Admitted(_))));
        hold.store(true, std::sync::atomic::Ordering::SeqCst);
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        for _ in 0..2 {
            let answer = admit().await;
            assert!(
                matches!(answer, Err(StoreError::Timeout(200))),
                "{answer:?}"
            );
        }
        let waiting = tasks();
        for _ in 0..5 {
            let answer = admit().await;
            assert!(
                matches!(answer, Err(StoreError::Timeout(200))),
                "{answer:?}"
            );
        }
        assert_eq!(tasks(), waiting, "no more late waits than allowed");
        assert_eq!(store.late_waits.available_permits(), 0);
        let mut redis = redis::Client::open("redis://127.0.0.1:6379")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    #[test]
    fn script_answers_parse() {
        assert_eq!(
            parse_admit(&[1, 5, 0, 7, 100], 2).unwrap(),
            StoreAnswer::Admitted(vec![(5, 0), (7, 100)])
        );
        assert_eq!(
            parse_admit(&[0, 2, 1500], 2).unwrap(),
            StoreAnswer::Refused {
                bucket: 1,
                wait_ms: 1500
            }
        );
        assert!(parse_admit(&[0, 3, 1], 2).is_err());
        assert!(parse_admit(&[1, 5], 2).is_err());
        assert!(parse_admit(&[], 0).is_err());
    }
}
