// Helpers shared by the httpyac collection (`require('./lib/signing.cjs')` from a script block)
// and by SIGNATURES.md, which shows worked examples produced by exactly these functions.
// Plain Node: only the built-in `crypto` module.
'use strict';

const crypto = require('crypto');

/**
 * Scheme 1, `X-Signature: t=<unix seconds>,v1=<hex>`.
 * The HMAC-SHA256 key is the secret's UTF-8 bytes; the message is "<t>.<raw body>".
 * Pass several secrets to get several `v1=` entries (what a provider sends while rotating).
 */
function xSignature(secrets, timestamp, rawBody) {
  const list = Array.isArray(secrets) ? secrets : [secrets];
  const t = String(timestamp);
  const v1 = list.map((secret) =>
    'v1=' + crypto.createHmac('sha256', Buffer.from(secret, 'utf8')).update(`${t}.${rawBody}`, 'utf8').digest('hex'));
  return `t=${t},${v1.join(',')}`;
}

/**
 * Scheme 2, Standard Webhooks (https://www.standardwebhooks.com):
 * `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<raw body>")>`,
 * key = base64-decode of the part after `whsec_`.
 * Returns the three headers.
 */
function standardWebhooks(whsecSecret, msgId, timestamp, rawBody) {
  if (!whsecSecret.startsWith('whsec_')) throw new Error('a Standard Webhooks secret starts with whsec_');
  const key = Buffer.from(whsecSecret.slice('whsec_'.length), 'base64');
  const ts = String(timestamp);
  const sig = crypto.createHmac('sha256', key).update(`${msgId}.${ts}.${rawBody}`, 'utf8').digest('base64');
  return { 'webhook-id': msgId, 'webhook-timestamp': ts, 'webhook-signature': `v1,${sig}` };
}

/** Unix seconds now (integer). */
function nowSeconds() {
  return Math.floor(Date.now() / 1000);
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

/**
 * The `test` attestation provider's token: an HS256 JWT, key = BLOCKREMOTE_ATTESTATION_TEST_SECRET's
 * UTF-8 bytes, claims `nonce`, `device_id`, `app_integrity`, `device_integrity` ("pass" / "fail").
 */
function testAttestationToken(secret, claims) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64url(JSON.stringify({ iat: nowSeconds(), ...claims }));
  const sig = crypto.createHmac('sha256', Buffer.from(secret, 'utf8')).update(`${header}.${payload}`).digest();
  return `${header}.${payload}.${b64url(sig)}`;
}

/**
 * One realistic 2 s heartbeat window (INTEGRATION.md §3): 50 Hz accelerometer (m/s², gravity
 * included, phone held in hand) and gyroscope (rad/s) with sensor noise, one tap (down/up) with
 * the motion impulse it causes, device-wide network counters and the context block.
 */
function heartbeat(seq, opts = {}) {
  const rnd = mulberry32(opts.seed ?? crypto.randomBytes(4).readUInt32LE(0));
  const noise = (a) => (rnd() - 0.5) * 2 * a;
  const accelerometer = [];
  const gyroscope = [];
  const tapAt = 640;
  for (let t = 0; t <= 1980; t += 20) {
    const impulse = t >= tapAt && t <= tapAt + 40 ? 0.35 : 0;
    accelerometer.push([t, round(0.42 + noise(0.05)), round(6.9 + noise(0.06)), round(6.95 + impulse + noise(0.06))]);
    gyroscope.push([t, round(noise(0.012) + impulse / 10), round(noise(0.012)), round(noise(0.008))]);
  }
  return {
    seq,
    sent_at: new Date().toISOString(),
    accelerometer,
    gyroscope,
    touches: [
      { t: tapAt, x: 0.41, y: 0.77, pressure: 0.62, size: 0.031, action: 'down' },
      { t: tapAt + 70, x: 0.412, y: 0.768, pressure: 0.58, size: 0.03, action: 'up' },
    ],
    network: { tx_bytes: 1200, rx_bytes: 5600, interval_ms: 2000 },
    context: {
      screen_capture: false,
      accessibility_services: [],
      installer: 'com.android.vending',
      app_hashes: [],
      dns: ['api.bank.example'],
    },
  };
}

function round(x) {
  return Math.round(x * 10000) / 10000;
}

// Small PRNG: pass `opts.seed` for a reproducible window. The default seed is random, because
// the engine rightly treats a window that another device already sent as a replay (a hard lock).
function mulberry32(a) {
  return function () {
    a |= 0;
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A fresh device id (8–64 of [A-Za-z0-9_-]) with a readable prefix. */
function deviceId(prefix) {
  return `${prefix}-${crypto.randomBytes(8).toString('hex')}`;
}

/** Poll `fn` (async, returns truthy when done) every `stepMs` for at most `maxMs`. */
async function until(fn, maxMs = 10000, stepMs = 100) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > maxMs) return v;
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

module.exports = { xSignature, standardWebhooks, nowSeconds, testAttestationToken, heartbeat, deviceId, until };
