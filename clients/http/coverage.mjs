#!/usr/bin/env node
// Checks that the request lines of the .http files beside this script exercise every operation
// (method + path) of an OpenAPI document. A WebSocket request (`WS`) counts as the GET it upgrades.
//
//   node http/coverage.mjs openapi.json
//
// Exits 1 listing the operations no request line reaches, and lists requests whose path is not
// in the document (a typo, or a route the document does not describe).
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const docPath = process.argv[2];
if (!docPath) {
  console.error('usage: node http/coverage.mjs <openapi.json>');
  process.exit(2);
}
const doc = JSON.parse(readFileSync(docPath, 'utf8'));
const methods = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'];

const operations = [];
for (const [path, item] of Object.entries(doc.paths)) {
  for (const m of methods) {
    if (item[m]) {
      const re = new RegExp('^' + path.replace(/[.]/g, '\\.').replace(/\{[^}]+\}/g, '[^/]+') + '$');
      operations.push({ method: m.toUpperCase(), path, re, hits: [] });
    }
  }
}

const dir = dirname(fileURLToPath(import.meta.url));
const requestLine = /^(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|WS)\s+\{\{(?:baseUrl|wsUrl)\}\}(\S*)/;
const unknown = [];
let requests = 0;
for (const file of readdirSync(dir).filter((f) => f.endsWith('.http')).sort()) {
  readFileSync(join(dir, file), 'utf8').split('\n').forEach((line, i) => {
    const m = requestLine.exec(line);
    if (!m) return;
    requests++;
    const method = m[1] === 'WS' ? 'GET' : m[1];
    // Template expressions in the path ({{device}}) stand for one segment (or part of one).
    const path = m[2].split('?')[0].replace(/\{\{[^}]*\}\}/g, 'x');
    const op = operations.find((o) => o.method === method && o.re.test(path));
    if (op) op.hits.push(`${file}:${i + 1}`);
    else unknown.push(`${file}:${i + 1}  ${m[1]} ${m[2]}`);
  });
}

const missing = operations.filter((o) => o.hits.length === 0);
console.log(`coverage: ${operations.length - missing.length}/${operations.length} operations of ${docPath} ` +
  `exercised by ${requests} request lines`);
if (unknown.length) {
  console.log('requests to paths the document does not list (expected only for deliberate 404/405 checks):');
  for (const u of unknown) console.log(`  ${u}`);
}
if (missing.length) {
  console.error('NOT exercised:');
  for (const o of missing) console.error(`  ${o.method} ${o.path}`);
  process.exit(1);
}
