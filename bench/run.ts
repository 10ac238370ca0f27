/**
 * Parley benchmark: `npm run bench` (≈ 13 minutes) or `BENCH_QUICK=1 npm run bench` (≈ 3 minutes).
 *
 * Starts Parley as its own process against real PostgreSQL (a fresh database, dropped at the end) and
 * NATS, drives it from separate load-worker processes, samples CPU and RSS of every process involved,
 * and writes bench/results/<timestamp>.json and bench/results/latest.md (quick, partial and profiled runs
 * write latest-quick.md, latest-partial.md, latest-profile.md instead).
 *
 * Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test: the server where the
 * bench database is created), BENCH_NATS_URL (default nats://127.0.0.1:4222), BENCH_QUICK=1,
 * BENCH_ONLY=a,b,c,d,e,f,g,h (a subset of scenarios; g and h repeat a and b over the SignalR hub),
 * BENCH_PROFILE=1 (server runs with --cpu-prof; the
 * profiles are summarised into the results; profiling slows the server, so do not compare those figures),
 * BENCH_SERVER_REF (run Parley from `git archive` of this commit, e.g. HEAD, instead of the working tree),
 * BENCH_PHASE_S (seconds per load phase), BENCH_RATES_CHATS10 / BENCH_RATES_CHATS100 (offered rates, comma-separated), BENCH_QUIET_WAIT_S (longest wait before each scenario for the
 * machine to calm down, default 20; the machine may be shared), BENCH_SERVER_NODE_OPTIONS (NODE_OPTIONS
 * for the server only, to compare V8 settings such as --max-semi-space-size), BENCH_SERVER_NODE_ARGS (flags put
 * before the server script, for those NODE_OPTIONS refuses, e.g. --trace-gc; the server log is in bench/tmp/),
 * BENCH_WORKER_NODE_ARGS (the same for the two receiving load workers, e.g. --cpu-prof --cpu-prof-dir=DIR).
 */
import { execFileSync, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { connect as natsConnect } from "nats";
import { killAllNow, stopAll } from "./lib/children.js";
import { Context, fullPlan, quickPlan } from "./lib/context.js";
import { fixedWorkReference } from "./lib/proc-stats.js";
import { profileMarkdown, summarise } from "./profile.js";
import { judge, markdown, type Results } from "./lib/report.js";
import { fanout1Scenario, fanoutScenario, historyScenario, idleScenario, lastServerReport, rawCeilings } from "./lib/scenarios.js";
import { WorkerHandle } from "./lib/worker-handle.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const quick = process.env.BENCH_QUICK === "1";
const only = new Set((process.env.BENCH_ONLY ?? "").split(",").map((s) => s.trim()).filter(Boolean));
const profile = process.env.BENCH_PROFILE === "1";
const baseDatabaseUrl = process.env.BENCH_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test";
const natsUrl = process.env.BENCH_NATS_URL ?? "nats://127.0.0.1:4222";
const plan = { ...(quick ? quickPlan : fullPlan) };
if (process.env.BENCH_PHASE_S) plan.phaseMs = Number(process.env.BENCH_PHASE_S) * 1000;
const rates = (name: string) => process.env[name]?.split(",").map(Number).filter((n) => n > 0);
plan.ratesChats10 = rates("BENCH_RATES_CHATS10") ?? plan.ratesChats10;
plan.ratesChats100 = rates("BENCH_RATES_CHATS100") ?? plan.ratesChats100;
/** Longest wait before each scenario for other processes on the machine to calm down. */
const quietWaitMs = Number(process.env.BENCH_QUIET_WAIT_S ?? (quick ? 0 : 20)) * 1000;
/** The whole run is abandoned (partial results written, everything cleaned up) after this. */
const hardLimitMs = (quick ? 6 : 22) * 60_000;

const started = new Date();
const stamp = started.toISOString().replace(/[:.]/g, "-");
const resultsDir = path.join(root, "bench/results");
const tmpDir = path.join(root, "bench/tmp", stamp);
fs.mkdirSync(resultsDir, { recursive: true });
fs.mkdirSync(tmpDir, { recursive: true });

const t0 = Date.now();
function log(line: string): void {
  console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${line}`);
}

function sh(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: "utf8", timeout: 5000, stdio: ["ignore", "pipe", "ignore"] }).trim();
  } catch {
    return "?";
  }
}

const results: Results = {
  startedAt: started.toISOString(),
  quick,
  environment: {
    cores: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? "?",
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    postgres: "?",
    nats: "?",
    commit: sh("git", ["-C", root, "rev-parse", "--short", "HEAD"]),
    dirty: sh("git", ["-C", root, "status", "--porcelain", "--", "src"]) !== "",
    loadBefore: os.loadavg().map((l) => l.toFixed(2)).join(" "),
    fixedWorkMicrosAtStart: fixedWorkReference(),
  },
  plan,
  clientNote:
    "Clients: every user holds one `NotificationService.Subscribe(include_messages=true)` stream over gRPC (HTTP/2; a lean client on node:http2 that decodes only the fields checked, bench/lib/raw-grpc.ts, so the load generators take less of the shared cores: Connect-es's client pipeline cost about as much CPU as the server); " +
    `the ${plan.receiverConnectionsPerWorker * 2} receiving HTTP/2 connections (${plan.receiverConnectionsPerWorker} per worker, 2 worker processes) multiplex all streams, ` +
    `the bearer token travels per call. Senders (1 worker process, ${plan.senderConnections} HTTP/2 connections) call SendMessage as a random member of a chat chosen round robin, ` +
    `open loop at the offered rate (at most 1,000 in flight, beyond that a send is counted as shed) or closed loop for saturation. Each message text (${plan.textBytes} bytes) carries its send time; ` +
    "each delivery is checked for its chat sequence (gaps, duplicates).",
  servers: {},
  machineBefore: {},
  profiles: {},
  errors: {},
};

let ctx: Context | undefined;
let cleaning: Promise<void> | undefined;
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    log("cleaning up: stopping every child process, dropping the database");
    try {
      if (ctx?.server) {
        const report = await ctx.stopServer();
        if (report) results.servers["(interrupted)"] = report;
      }
    } catch {
      /* below */
    }
    await stopAll(5000).catch(() => {});
    if (ctx) {
      await ctx.dropDatabase().then(
        () => log(`database ${ctx!.dbName} dropped`),
        (error) => log(`could not drop ${ctx!.dbName}: ${error}`),
      );
      await ctx.admin.end({ timeout: 5 }).catch(() => {});
    }
  })();
  return cleaning;
}

function writeResults(): void {
  results.finishedAt = new Date().toISOString();
  results.durationSeconds = Math.round((Date.now() - t0) / 1000);
  for (const [key, report] of lastServerReport) results.servers[key] = report;
  results.targets = judge(results);
  // Profiled, smoke (quick) and partial (BENCH_ONLY) runs never replace latest.md.
  const kind = [profile ? "profile" : "", quick ? "quick" : "", only.size ? "partial" : ""].filter(Boolean).join("-");
  const json = path.join(resultsDir, `${stamp}${kind ? `-${kind}` : ""}.json`);
  const md = path.join(resultsDir, kind ? `latest-${kind}.md` : "latest.md");
  results.rawFile = path.relative(root, json);
  fs.writeFileSync(json, JSON.stringify(results, null, 2));
  fs.writeFileSync(md, markdown(results) + "\n");
  log(`results: ${path.relative(root, json)} and ${path.relative(root, md)}`);
}

process.on("exit", killAllNow);
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    log(`${signal}: aborting`);
    results.errors.run = `interrupted by ${signal}`;
    void cleanup().finally(() => {
      writeResults();
      process.exit(130);
    });
  });
}
const hardLimit = setTimeout(() => {
  log(`hard time limit of ${hardLimitMs / 60_000} minutes reached: aborting`);
  results.errors.run = `aborted at the hard time limit (${hardLimitMs / 60_000} min)`;
  void cleanup().finally(() => {
    writeResults();
    process.exit(1);
  });
}, hardLimitMs);
hardLimit.unref();

async function scenario(key: string, name: string, run: () => Promise<void>): Promise<void> {
  if (only.size > 0 && !only.has(key)) return;
  log(`(${key}) ${name}`);
  if (ctx) {
    // The machine may be shared: wait (bounded) for a calmer moment and record how busy it was.
    const quiet = await ctx.waitForQuietMachine(quietWaitMs, 50);
    results.machineBefore[key] = quiet;
    log(`(${key}) machine ${quiet.busyPercent}% busy (of ${os.cpus().length * 100}%) after waiting ${Math.round(quiet.waitedMs / 1000)} s`);
  }
  const begun = Date.now();
  try {
    await run();
  } catch (error) {
    results.errors[key] = (error as Error)?.stack ?? String(error);
    log(`(${key}) FAILED: ${(error as Error)?.message ?? error}`);
    if (ctx?.server) {
      const report = await ctx.stopServer().catch(() => undefined);
      if (report) results.servers[`${key} (failed)`] = report;
    }
  }
  log(`(${key}) done in ${((Date.now() - begun) / 1000).toFixed(0)} s`);
}

/**
 * The tree may change while the benchmark runs (other people edit it): BENCH_SERVER_REF=HEAD (or any
 * commit) runs Parley from `git archive` of that commit instead, with the checkout's node_modules.
 */
function exportCommit(ref: string): string {
  const sha = execFileSync("git", ["-C", root, "rev-parse", "--verify", `${ref}^{commit}`], { encoding: "utf8", timeout: 10_000 }).trim();
  results.environment.serverCommit = sha.slice(0, 12);
  const dir = path.join(root, "bench/tmp", `server-src-${sha.slice(0, 12)}`);
  if (!fs.existsSync(path.join(dir, "src/main.ts"))) {
    fs.mkdirSync(dir, { recursive: true });
    const out = spawnSync("sh", ["-c", 'git -C "$1" archive "$2" | tar -x -C "$3"', "sh", root, sha, dir], { timeout: 60_000, encoding: "utf8" });
    if (out.status !== 0) throw new Error(`git archive ${sha} failed: ${out.stderr}`);
    fs.symlinkSync(path.join(root, "node_modules"), path.join(dir, "node_modules"));
  }
  log(`Parley runs from commit ${sha.slice(0, 12)} (${path.relative(root, dir)})`);
  return dir;
}

async function main(): Promise<void> {
  log(`Parley benchmark${quick ? " (quick)" : ""}; logs in ${path.relative(root, tmpDir)}`);
  // Services first: fail fast with a clear message.
  const nc = await natsConnect({ servers: natsUrl, timeout: 5000 }).catch((error) => {
    throw new Error(`NATS at ${natsUrl} is not reachable: ${error.message}`);
  });
  results.environment.nats = nc.info?.version ?? "?";
  await nc.close();

  const secret = crypto.randomBytes(32).toString("hex");
  const env = { BENCH_JWT_SECRET: secret };
  const workerScript = path.join(root, "bench/load-worker.ts");
  const workerArgs = (process.env.BENCH_WORKER_NODE_ARGS ?? "").split(" ").filter(Boolean);
  const receivers = [new WorkerHandle("receiver-1", workerScript, env, workerArgs), new WorkerHandle("receiver-2", workerScript, env, workerArgs)];
  const sender = new WorkerHandle("sender", workerScript, env);
  ctx = new Context(root, plan, baseDatabaseUrl, natsUrl, secret, receivers, sender, tmpDir,
    profile ? path.join(tmpDir, "profiles") : undefined, log);
  const [{ version }] = (await ctx.admin`SELECT version()`) as unknown as [{ version: string }];
  results.environment.postgres = version.split(" on ")[0];
  const serverRef = process.env.BENCH_SERVER_REF;
  if (serverRef) {
    ctx.serverRoot = exportCommit(serverRef);
    results.environment.server = `commit ${results.environment.serverCommit} exported to ${path.relative(root, ctx.serverRoot)} (BENCH_SERVER_REF=${serverRef})`;
  } else {
    results.environment.server = "working tree";
  }
  await ctx.createDatabase();
  log(`database ${ctx.dbName} created; workers ${[...receivers, sender].map((w) => `${w.name}=${w.pid}`).join(", ")}`);
  const c = ctx;
  await Promise.all(c.workers.map((w) => w.call("memory", {}, 60_000)));

  await scenario("f", "raw ceilings: PostgreSQL inserts, NATS pub/sub, plain ws broadcast", async () => {
    results.raw = await rawCeilings(c);
  });
  await scenario("a", "1,000 clients in chats of 10", async () => {
    results.chats10 = await fanoutScenario(c, "a", 10, 1000, plan.ratesChats10);
  });
  await scenario("b", "1,000 clients in chats of 100", async () => {
    results.chats100 = await fanoutScenario(c, "b", 100, 1000, plan.ratesChats100);
  });
  await scenario("g", "1,000 clients in chats of 10 over the SignalR hub", async () => {
    results.chats10Hub = await fanoutScenario(c, "g", 10, 1000, plan.ratesChats10, "hub");
  });
  await scenario("h", "1,000 clients in chats of 100 over the SignalR hub", async () => {
    results.chats100Hub = await fanoutScenario(c, "h", 100, 1000, plan.ratesChats100, "hub");
  });
  await scenario("c", "send throughput at saturation, fan-out 1", async () => {
    results.fanout1 = await fanout1Scenario(c);
  });
  await scenario("d", "memory per idle Subscribe stream", async () => {
    results.idle = await idleScenario(c);
  });
  await scenario("e", "history: ListMessages last 50", async () => {
    results.history = await historyScenario(c);
  });

  if (profile) {
    const profileDir = path.join(tmpDir, "profiles");
    const parts: string[] = [];
    for (const [key, report] of lastServerReport) {
      if (!report.profile) continue;
      try {
        const s = summarise(report.profile, 30);
        results.profiles[key] = s;
        parts.push(`## Server CPU profile: ${key}`, "", profileMarkdown(s, 20), "");
      } catch (error) {
        results.profiles[key] = `could not read ${report.profile}: ${error}`;
      }
    }
    if (parts.length) fs.writeFileSync(path.join(profileDir, "summary.md"), parts.join("\n"));
    log(`profiles summarised in ${path.relative(root, path.join(profileDir, "summary.md"))}`);
  }
}

try {
  await main();
} catch (error) {
  results.errors.run = (error as Error)?.stack ?? String(error);
  log(`FAILED: ${(error as Error)?.message ?? error}`);
  process.exitCode = 1;
} finally {
  await cleanup();
  writeResults();
  clearTimeout(hardLimit);
}
const missed = (results.targets ?? []).filter((t) => t.met === false).length;
log(`finished in ${((Date.now() - t0) / 1000).toFixed(0)} s; ${missed} target(s) missed`);
process.exit(process.exitCode ?? 0);
