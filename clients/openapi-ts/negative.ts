// Proof that the generated types are strict enough to catch client mistakes: every line marked
// `@ts-expect-error` MUST be a type error. If the document loosened (an `any`, a dropped
// `additionalProperties: false`, a lost enum) the directive itself becomes the error
// ("Unused '@ts-expect-error' directive") and `tsc --noEmit` fails.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type Heartbeat = components["schemas"]["HeartbeatBody"];

const api = createClient<paths>({ baseUrl: "http://127.0.0.1:8000" });

export const wrongFieldName: Heartbeat = {
  seq: 1,
  sent_at: "2026-11-22T12:00:00.000Z",
  // @ts-expect-error the field is `touches`
  touch: [],
};

export const wrongType: Heartbeat = {
  // @ts-expect-error seq is a number
  seq: "1",
  sent_at: "2026-11-22T12:00:00.000Z",
};

// @ts-expect-error sent_at is required
export const missingRequired: Heartbeat = { seq: 1 };

export const sampleArity: Heartbeat = {
  seq: 1,
  sent_at: "2026-11-22T12:00:00.000Z",
  // @ts-expect-error a sample is [t_ms, x, y, z]
  accelerometer: [[0, 0.1, 9.8]],
};

export const touchAction: Heartbeat = {
  seq: 1,
  sent_at: "2026-11-22T12:00:00.000Z",
  // @ts-expect-error action is down | move | up
  touches: [{ t: 0, x: 0.5, y: 0.5, pressure: 0.5, size: 0.03, action: "tap" }],
};

export const networkField: Heartbeat = {
  seq: 1,
  sent_at: "2026-11-22T12:00:00.000Z",
  // @ts-expect-error the fields are tx_bytes / rx_bytes / interval_ms
  network: { tx: 1, rx_bytes: 2, interval_ms: 2000 },
};

export const contextField: Heartbeat = {
  seq: 1,
  sent_at: "2026-11-22T12:00:00.000Z",
  // @ts-expect-error screen_capture is a boolean
  context: { screen_capture: "no" },
};

export async function calls(): Promise<void> {
  // @ts-expect-error the heartbeat route requires the X-Device-Id header parameter
  await api.POST("/v1/signals/heartbeat", { body: { seq: 1, sent_at: "2026-11-22T12:00:00.000Z" } });

  // @ts-expect-error no such path
  await api.GET("/v1/security/trustscore", {});

  await api.POST("/v1/admin/devices/{device_id}/lock", {
    params: { path: { device_id: "a1b2c3d4e5f6" } },
    // @ts-expect-error not an Action
    body: { action: "LOCK", reason: "fraud_team_request" },
  });

  const r = await api.GET("/v1/security/trust-score", { params: { header: { "X-Device-Id": "a1b2c3d4e5f6" } } });
  if (r.data) {
    // @ts-expect-error trust_score is a number
    const s: string = r.data.trust_score;
    void s;
  }
}
