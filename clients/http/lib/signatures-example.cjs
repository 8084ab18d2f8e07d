// The fixed worked examples of SIGNATURES.md. billing.http checks that lib/signing.cjs still
// produces the expected headers below from these inputs, and that the server accepts the same
// body bytes signed the same way at the current time. Keep SIGNATURES.md in step with this file.
'use strict';

// Scheme 1: X-Signature.
const xSignature = {
  secret: 'example-x-signature-secret-2026-01',
  timestamp: 1763812800, // 2025-11-22T12:00:00Z
  eventId: 'evt_1Q2w3E',
  body: '{"id":"evt_1Q2w3E","type":"subscription.activated","created":1763812800,"data":{"external_user_id":"cust_8412","plan":"paid_basic","status":"active","current_period_end":"2026-12-23T00:00:00Z"}}',
  expectedHeader: 't=1763812800,v1=f7700f8ad5bd4ee790938e5f492ff70a914b1046fb2f5d7edd918d02bf77cb7d',
};

// Scheme 2: Standard Webhooks. The secret is the Standard Webhooks specification's own test
// secret (24 key bytes), so the reference vector below checks the same code against the spec.
const standardWebhooks = {
  secret: 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
  msgId: 'msg_2YbVk1d8QmZ4pT7w',
  timestamp: 1763812860, // 2025-11-22T12:01:00Z
  eventId: 'evt_1Q2w3F',
  body: '{"id":"evt_1Q2w3F","type":"subscription.updated","created":1763812860,"data":{"external_user_id":"cust_8412","plan":"paid","status":"active","current_period_end":"2026-12-23T00:00:00Z"}}',
  expectedSignature: 'v1,/ObOV4/K4tN0J9KvS8DGFAik+qsaMAfNFFBhVvQAkrw=',
};

// The Standard Webhooks specification's published test vector.
const standardWebhooksReference = {
  secret: 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
  msgId: 'msg_p5jXN8AQM9LWM0D4loKWxJek',
  timestamp: 1614265330,
  body: '{"test": 2432232314}',
  expectedSignature: 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=',
};

module.exports = { xSignature, standardWebhooks, standardWebhooksReference };
