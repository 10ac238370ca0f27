// Runs every test/*.test.ts in its own process and prints one closing line: "N passed, M failed".
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const testDir = path.dirname(fileURLToPath(import.meta.url));
const only = process.argv.slice(2);
const files = fs
  .readdirSync(testDir)
  .filter((f) => f.endsWith(".test.ts"))
  .filter((f) => only.length === 0 || only.some((o) => f.includes(o)))
  .sort();

const backends = `database: ${process.env.TEST_DATABASE_URL ? "PostgreSQL (TEST_DATABASE_URL)" : "embedded PGlite"}, ` +
  `bus: ${process.env.TEST_NATS_URL ? "NATS (TEST_NATS_URL)" : "in-process"}`;
console.log(`parley tests — ${backends}`);
if (!process.env.TEST_DATABASE_URL || !process.env.TEST_NATS_URL) {
  console.log("!!! SKIPPED: suites against real PostgreSQL/NATS need TEST_DATABASE_URL and TEST_NATS_URL (.ci/run sets both) !!!");
}

let passed = 0;
let failed = 0;
let skipped = 0;
for (const file of files) {
  const started = Date.now();
  const { code, output } = await run(path.join(testDir, file));
  const clean = output.replace(/\x1b\[[0-9;]*m/g, "");
  const total = Number(/Total:\s+(\d+)/.exec(clean)?.[1] ?? 0);
  const ok = Number(/Passed:\s+(\d+)/.exec(clean)?.[1] ?? 0);
  const skip = Number(/Skipped:\s+(\d+)/.exec(clean)?.[1] ?? 0);
  let bad = total - ok;
  if (code !== 0 && bad === 0) bad = 1; // crashed or hung before uvu could report
  passed += ok;
  failed += bad;
  skipped += skip;
  console.log(`${bad === 0 ? "ok  " : "FAIL"} ${file}: ${ok} passed, ${bad} failed (${((Date.now() - started) / 1000).toFixed(1)}s)`);
  if (bad > 0) process.stdout.write(output);
}
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
process.exit(failed === 0 ? 0 : 1);

function run(file) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--import", "tsx", file], {
      env: { ...process.env, NO_COLOR: "1", FORCE_COLOR: "0" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (d) => (output += d));
    child.stderr.on("data", (d) => (output += d));
    // A suite that hangs must not hang CI.
    const timer = setTimeout(() => {
      output += `\n${file}: killed after 600 s\n`;
      child.kill("SIGKILL");
    }, 600_000);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, output });
    });
  });
}
