#!/usr/bin/env node
// Summarises `httpyac send --json` output: one line per .http file, every failed or errored
// assertion with the response that caused it, and a closing "N passed, N failed" line.
// Exits 1 when any assertion failed or errored, when a request was skipped, or when fewer
// requests ran than the .http files contain (a request httpyac silently dropped).
//
//   node http/report.mjs results.json
import { readFileSync, readdirSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const results = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const dir = dirname(fileURLToPath(import.meta.url));
const requestLine = /^(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|WS)\s+\{\{/;

const expected = {};
for (const f of readdirSync(dir).filter((f) => f.endsWith('.http')).sort()) {
  expected[f] = readFileSync(join(dir, f), 'utf8').split('\n').filter((l) => requestLine.test(l)).length;
}

const perFile = {};
const failures = [];
let passed = 0;
let failed = 0;
for (const r of results.requests) {
  const file = basename(r.fileName);
  const s = (perFile[file] ??= { requests: 0, tests: 0, failed: 0 });
  s.requests++;
  for (const t of r.testResults ?? []) {
    s.tests++;
    if (t.status === 'SUCCESS') passed++;
    else {
      failed++;
      s.failed++;
      failures.push({ file, name: r.name, line: r.line, test: t, response: r.response });
    }
  }
  if (!r.testResults?.length) {
    // A request without a single assertion result: it errored before any ran, or it asserts nothing.
    failed++;
    s.failed++;
    failures.push({ file, name: r.name, line: r.line, test: { status: 'NO_RESULT', message: 'no assertion ran' }, response: r.response });
  }
}

let problems = 0;
for (const [file, n] of Object.entries(expected)) {
  const s = perFile[file] ?? { requests: 0, tests: 0, failed: 0 };
  const note = s.requests === n ? '' : `  <-- ${n} requests in the file, ${s.requests} ran`;
  if (s.requests !== n) problems++;
  console.log(`  ${file.padEnd(18)} ${String(s.requests).padStart(3)} requests ${String(s.tests).padStart(4)} assertions ${String(s.failed).padStart(3)} failed${note}`);
}

for (const f of failures) {
  const status = f.response?.statusCode;
  let body = f.response?.body;
  if (typeof body !== 'string') body = body === undefined ? '' : JSON.stringify(body);
  console.log(`\nFAILED ${f.file}:${f.line + 1} [${f.name}] ${f.test.status}: ${f.test.message}`);
  if (f.test.error?.displayMessage) console.log(`  ${f.test.error.displayMessage}`);
  if (status !== undefined) console.log(`  response ${status}: ${body.slice(0, 600)}`);
}

const sum = results.summary ?? {};
if (sum.skippedRequests) {
  problems++;
  console.log(`\n${sum.skippedRequests} request(s) skipped`);
}
console.log(`\nhttpyac: ${sum.totalRequests} requests (${sum.successRequests} succeeded, ${sum.failedRequests} failed, ${sum.erroredRequests} errored)`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || problems > 0 ? 1 : 0);
