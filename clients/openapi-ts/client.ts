// A typed BlockRemote client: openapi-fetch over the types openapi-typescript generates from the
// server's own OpenAPI document (`blockremote openapi` → openapi.json → schema.d.ts; see
// ../run-http.sh). `tsc --noEmit --strict` over this file fails when a path, a field name, a
// field type or a required header drifts from the document. negative.ts proves that it would.
//
// Run (after `tsc -p openapi-ts --outDir <dir>`): BLOCKREMOTE_URL=… BLOCKREMOTE_ADMIN_TOKEN=… node <dir>/client.js
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type Schemas = components["schemas"];
export type HeartbeatBody = Schemas["HeartbeatBody"];
export type Sample = Schemas["Sample"];
export type Touch = Schemas["Touch"];
export type TrustReport = Schemas["TrustReport"];
export type DeviceCommand = Schemas["DeviceCommand"];
export type Action = Schemas["Action"];

/** A failed call: the RFC 9457 problem the server answered (or a transport failure). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly problem: Partial<Schemas["Problem"]> | undefined,
  ) {
    super(`HTTP ${status}${problem?.code ? ` ${problem.code}` : ""}${problem?.detail ? `: ${problem.detail}` : ""}`);
  }
}

function ok<T>(r: { data?: T; error?: unknown; response: Response }): T {
  if (r.data === undefined) throw new ApiError(r.response.status, r.error as Partial<Schemas["Problem"]> | undefined);
  return r.data;
}

export function publicClient(baseUrl: string) {
  return createClient<paths>({ baseUrl });
}

/** Device calls: Authorization (device JWT) + X-Device-Id on every request. */
export class DeviceSession {
  private readonly api;
  constructor(
    baseUrl: string,
    readonly deviceId: string,
    accessToken: string,
  ) {
    this.api = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${accessToken}` } });
  }

  async heartbeat(body: HeartbeatBody): Promise<Schemas["Accepted"]> {
    return ok(
      await this.api.POST("/v1/signals/heartbeat", {
        params: { header: { "X-Device-Id": this.deviceId } },
        body,
      }),
    );
  }

  async trustScore(): Promise<TrustReport> {
    return ok(
      await this.api.GET("/v1/security/trust-score", {
        params: { header: { "X-Device-Id": this.deviceId } },
      }),
    );
  }
}

export async function register(
  baseUrl: string,
  creds: Schemas["Credentials"],
): Promise<Schemas["SessionTokens"]> {
  return ok(await publicClient(baseUrl).POST("/v1/auth/register", { body: creds }));
}

/** Operator calls with the admin API key. */
export function adminClient(baseUrl: string, adminKey: string) {
  const api = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${adminKey}` } });
  return {
    async lock(deviceId: string, action: Exclude<Action, "UNLOCK">, reason: string): Promise<DeviceCommand> {
      return ok(
        await api.POST("/v1/admin/devices/{device_id}/lock", {
          params: { path: { device_id: deviceId } },
          body: { action, reason },
        }),
      );
    },
    async unlock(deviceId: string, opts: Schemas["UnlockRequest"] = {}): Promise<DeviceCommand> {
      return ok(
        await api.POST("/v1/admin/devices/{device_id}/unlock", {
          params: { path: { device_id: deviceId } },
          body: opts,
        }),
      );
    },
    async device(deviceId: string): Promise<Schemas["DeviceView"]> {
      return ok(await api.GET("/v1/admin/devices/{device_id}", { params: { path: { device_id: deviceId } } }));
    },
  };
}

/** One 2 s window (docs/INTEGRATION.md §3): every part of the heartbeat body, typed. */
export function exampleHeartbeat(seq: number, random: () => number = Math.random): HeartbeatBody {
  const noise = (a: number) => (random() - 0.5) * 2 * a;
  const accelerometer: Sample[] = [];
  const gyroscope: Sample[] = [];
  for (let t = 0; t <= 1980; t += 20) {
    const impulse = t >= 640 && t <= 680 ? 0.35 : 0;
    accelerometer.push([t, 0.42 + noise(0.05), 6.9 + noise(0.06), 6.95 + impulse + noise(0.06)]);
    gyroscope.push([t, noise(0.012) + impulse / 10, noise(0.012), noise(0.008)]);
  }
  const touches: Touch[] = [
    { t: 640, x: 0.41, y: 0.77, pressure: 0.62, size: 0.031, action: "down" },
    { t: 710, x: 0.412, y: 0.768, pressure: 0.58, size: 0.03, action: "up" },
  ];
  return {
    seq,
    sent_at: new Date().toISOString(),
    accelerometer,
    gyroscope,
    touches,
    network: { tx_bytes: 1200, rx_bytes: 5600, interval_ms: 2000 },
    context: {
      screen_capture: false,
      accessibility_services: [],
      installer: "com.android.vending",
      app_hashes: [],
      dns: ["api.bank.example"],
    },
  };
}

// A tiny end-to-end run against a live server; ../run-http.sh runs it after `tsc`.
declare const process: { env: Record<string, string | undefined>; exitCode?: number };

async function main(): Promise<void> {
  const baseUrl = process.env.BLOCKREMOTE_URL;
  const adminKey = process.env.BLOCKREMOTE_ADMIN_TOKEN;
  if (!baseUrl || !adminKey) throw new Error("set BLOCKREMOTE_URL and BLOCKREMOTE_ADMIN_TOKEN");
  const deviceId = `ts-${Date.now().toString(36)}-${Math.floor(Math.random() * 1e9).toString(36)}`;
  const tokens = await register(baseUrl, {
    email: `${deviceId}@example.com`,
    password: "correct horse battery staple",
    device_id: deviceId,
    device_fingerprint: `fp-${deviceId}`,
    platform: "android",
  });
  const device = new DeviceSession(baseUrl, deviceId, tokens.access_token);
  for (const seq of [1, 2]) {
    const accepted = await device.heartbeat(exampleHeartbeat(seq));
    if (!accepted.accepted || accepted.seq !== seq) throw new Error(`heartbeat ${seq}: ${JSON.stringify(accepted)}`);
  }
  let report = await device.trustScore();
  for (let i = 0; i < 100 && report.last_seq < 2; i++) {
    await new Promise((r) => setTimeout(r, 100));
    report = await device.trustScore();
  }
  if (report.last_seq !== 2) throw new Error(`trust report never reached seq 2: ${JSON.stringify(report)}`);
  const admin = adminClient(baseUrl, adminKey);
  const lock = await admin.lock(deviceId, "CRITICAL_LOCK", "fraud_team_request");
  let refused: ApiError | undefined;
  try {
    await device.trustScore();
  } catch (e) {
    if (e instanceof ApiError) refused = e;
    else throw e;
  }
  if (refused?.status !== 403 || refused.problem?.code !== "device_locked") {
    throw new Error(`expected 403 device_locked while locked, got ${String(refused)}`);
  }
  const unlock = await admin.unlock(deviceId, { reason: "customer_verified" });
  const view = await admin.device(deviceId);
  if (view.status !== "active") throw new Error(`device not active after unlock: ${view.status}`);
  console.log(
    `typed client: registered ${deviceId}, 2 heartbeats scored (trust ${report.trust_score}, ${report.level}), ` +
      `locked (seq ${lock.seq}, refused with ${refused.problem?.code}), unlocked (seq ${unlock.seq})`,
  );
}

// Only when run as a program, not when imported.
if (typeof process !== "undefined" && process.env.BLOCKREMOTE_TS_CLIENT_RUN === "1") {
  main().catch((e: unknown) => {
    console.error(`typed client: FAILED: ${e instanceof Error ? e.message : String(e)}`);
    process.exitCode = 1;
  });
}
