import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Histogram, type HistogramData, type LatencySummary } from "./hist.js";
import { Context, round, sleep, summary, type ServerReport, type StandIn } from "./context.js";
import type { WindowUsage } from "./proc-stats.js";
import { parseMetrics } from "./parley-server.js";
import { WorkerHandle } from "./worker-handle.js";
import { heapDiff, type HeapDiffRow } from "../heap-diff.js";

const hex = () => crypto.randomBytes(3).toString("hex");
const MIB = 1024 * 1024;

export interface Chat {
  id: string;
  members: string[];
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

async function createChats(ctx: Context, tenant: string, groups: string[][], name: string): Promise<Chat[]> {
  const { ids } = await ctx.sender.call<{ ids: string[] }>(
    "createChats", { baseUrl: ctx.server!.url, tenant, groups, concurrency: 8, name }, 300_000,
  );
  return ids.map((id, i) => ({ id, members: groups[i]! }));
}

/** How receivers get events and senders send: gRPC (Subscribe streams, SendMessage calls) or the SignalR hub (one WebSocket per user). */
export type Via = "grpc" | "hub";
/** How senders call SendMessage when not over the hub: gRPC, or the Connect protocol (binary) on the same port. */
export type SendProtocol = "grpc" | "connect";

/** Opens one Subscribe stream (or, via the hub, one hub connection) per user, spread over the receiver workers. */
async function subscribeAll(ctx: Context, tenant: string, users: string[], opts: { connectionsPerWorker?: number; dedicated?: boolean; reopen?: boolean; via?: Via } = {}) {
  // Users dealt round robin to the receiver workers.
  const parts = ctx.receivers.map((_, r) => users.filter((_, i) => i % ctx.receivers.length === r));
  const results = await Promise.all(
    ctx.receivers.map((worker, r) =>
      worker.call<{ ready: number; failed: number; ms: number }>(opts.via === "hub" ? "hubSubscribe" : "subscribe", {
        baseUrl: ctx.server!.url,
        tenant,
        users: parts[r],
        connections: opts.dedicated ? parts[r]!.length : (opts.connectionsPerWorker ?? ctx.plan.receiverConnectionsPerWorker),
        includeMessages: true,
        reopen: opts.reopen ?? true,
        batch: 250,
        readyTimeoutMs: 180_000,
      }, 240_000),
    ),
  );
  return {
    ready: results.reduce((a, r) => a + r.ready, 0),
    failed: results.reduce((a, r) => a + r.failed, 0),
    ms: Math.max(...results.map((r) => r.ms)),
  };
}

async function closeAll(ctx: Context) {
  await Promise.all(ctx.receivers.map((w) => w.call("closeStreams", {}, 30_000)));
  await Promise.all(ctx.receivers.map((w) => w.call("resetReceivers", {}, 30_000)));
  await ctx.sender.call("closeSenders", {}, 30_000);
}

interface ReceiverStats {
  phases: Record<string, { received: number; dups: number; outOfOrder: number; hist: HistogramData; first: number; last: number; perMessage?: string }>;
  totals: {
    messages: number; dups: number; silentGaps: number; gapsAfterReopen: number; outOfOrder: number; maxReorderDistance: number; noBody: number;
    heartbeats: number; otherEvents: Record<string, number>; streamErrors: Record<string, number>; reopened: number;
  };
  openStreams: number;
  byChat?: Record<string, number>;
}

async function receiverStats(ctx: Context, phases?: string[], byChat = false, perMessage = false): Promise<ReceiverStats[]> {
  return Promise.all(ctx.receivers.map((w) => w.call<ReceiverStats>("stats", { phases, byChat, perMessage }, 60_000)));
}

function u16(base64: string | undefined): Uint16Array {
  if (!base64) return new Uint16Array(0);
  const bytes = new Uint8Array(Buffer.from(base64, "base64"));
  return new Uint16Array(bytes.buffer, 0, bytes.length >> 1);
}

function mergeTotals(stats: ReceiverStats[]) {
  const out = { messages: 0, dups: 0, silentGaps: 0, gapsAfterReopen: 0, outOfOrder: 0, maxReorderDistance: 0, noBody: 0, reopened: 0, openStreams: 0, streamErrors: {} as Record<string, number>, otherEvents: {} as Record<string, number> };
  for (const s of stats) {
    out.messages += s.totals.messages;
    out.dups += s.totals.dups;
    out.silentGaps += s.totals.silentGaps;
    out.gapsAfterReopen += s.totals.gapsAfterReopen;
    out.outOfOrder += s.totals.outOfOrder;
    out.maxReorderDistance = Math.max(out.maxReorderDistance, s.totals.maxReorderDistance);
    out.noBody += s.totals.noBody;
    out.reopened += s.totals.reopened;
    out.openStreams += s.openStreams;
    for (const [k, v] of Object.entries(s.totals.streamErrors)) out.streamErrors[k] = (out.streamErrors[k] ?? 0) + v;
    for (const [k, v] of Object.entries(s.totals.otherEvents)) out.otherEvents[k] = (out.otherEvents[k] ?? 0) + v;
  }
  return out;
}

interface SendResult {
  attempted: number; accepted: number; shed: number; errors: Record<string, number>;
  acceptedPerChat: Record<string, number>; stillInFlight: number; elapsedMs: number; acceptedPerSecond: number;
  perSecond: number[]; sendLatency: HistogramData; started: number; sendEnd: number; acceptedChats: string;
}

function addCounts(into: Record<string, number>, from: Record<string, number>): void {
  for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
}

/** One result from several sending workers (message numbers never overlap: see `numbering`). */
function mergeSends(parts: SendResult[]): SendResult {
  const hist = new Histogram();
  const errors: Record<string, number> = {};
  const acceptedPerChat: Record<string, number> = {};
  const perSecond: number[] = [];
  const chats = parts.map((p) => u16(p.acceptedChats));
  const acceptedChats = new Uint16Array(Math.max(0, ...chats.map((c) => c.length)));
  for (const [j, p] of parts.entries()) {
    hist.merge(p.sendLatency);
    addCounts(errors, p.errors);
    addCounts(acceptedPerChat, p.acceptedPerChat);
    p.perSecond.forEach((n, second) => (perSecond[second] = (perSecond[second] ?? 0) + n));
    chats[j]!.forEach((chat, i) => chat && (acceptedChats[i] = chat));
  }
  const started = Math.min(...parts.map((p) => p.started));
  const sendEnd = Math.max(...parts.map((p) => p.sendEnd));
  const sum = (f: (p: SendResult) => number) => parts.reduce((a, p) => a + f(p), 0);
  return {
    attempted: sum((p) => p.attempted), accepted: sum((p) => p.accepted), shed: sum((p) => p.shed), errors, acceptedPerChat,
    stillInFlight: sum((p) => p.stillInFlight), elapsedMs: Math.round(sendEnd - started),
    acceptedPerSecond: sum((p) => p.accepted) / ((sendEnd - started) / 1000),
    perSecond: Array.from(perSecond, (v) => v ?? 0), sendLatency: hist.toJSON(), started, sendEnd,
    acceptedChats: Buffer.from(acceptedChats.buffer).toString("base64"),
  };
}

/**
 * Sends for one phase. Over gRPC the sender worker calls SendMessage as any member; over the hub each
 * receiver worker sends on the connections it holds, with the load split evenly between them.
 */
async function sendPhase(ctx: Context, via: Via, args: Record<string, unknown> & { rate: number; concurrency: number; maxInFlight: number; durationMs: number }): Promise<SendResult> {
  const timeout = args.durationMs + 60_000;
  if (via === "grpc") return ctx.sender.call<SendResult>("send", args, timeout);
  const n = ctx.receivers.length;
  return mergeSends(await Promise.all(ctx.receivers.map((worker, r) => worker.call<SendResult>("send", {
    ...args, via, numbering: { stride: n, offset: r },
    rate: args.rate / n, concurrency: Math.ceil(args.concurrency / n), maxInFlight: Math.ceil(args.maxInFlight / n),
  }, timeout))));
}

export interface PhaseResult {
  label: string;
  offered: string;
  offeredRate: number | null;
  seconds: number;
  attempted: number;
  accepted: number;
  acceptedPerSecond: number;
  /** Sends the client could not start because maxInFlight requests were already waiting. */
  shed: number;
  sendErrors: Record<string, number>;
  expectedDeliveries: number;
  /** Deliveries of accepted messages (at most one per member and message). */
  received: number;
  duplicates: number;
  /** Deliveries that arrived after a higher sequence of the same chat on the same stream. */
  outOfOrder: number;
  /** Expected deliveries of accepted messages that never arrived. */
  lost: number;
  /** Accepted messages that did not reach every member. */
  incompleteMessages: number;
  /** Deliveries of messages whose SendMessage failed on the client (e.g. deadline) but which were committed. */
  deliveriesOfFailedSends: number;
  /** Lost as counted right after the phase's own drain window (the final figures are counted at the end of the scenario). */
  lostAtPhaseEnd: number;
  /** Deliveries that arrived only after the phase's drain window (counted in `received` and the latency). */
  lateDeliveries?: number;
  deliveriesPerSecond: number;
  /** From the end of sending to the last delivery of this phase. */
  drainMs: number;
  latency: LatencySummary;
  sendLatency: LatencySummary;
  perSecondAccepted: number[];
  usage: WindowUsage | undefined;
  /**
   * Event-loop delay (ms) while sending, of Parley and of the worst load worker, as the monitors read it
   * (including their 10 ms timer interval, see report.ts): a stall in either delays deliveries or their timing.
   */
  loopDelay?: { server: LoopDelay; clients: LoopDelay };
  /** Parley's send statements during the phase (from its /metrics). */
  sendStatements?: SendStatements;
}

interface LoopDelay { p99: number; max: number }

interface SendStatements {
  count: number;
  meanSends: number;
  /** Statement duration quantiles as histogram bucket bounds. */
  duration: { p50: string; p99: string };
}

/**
 * Parley's /metrics now, and the event-loop delays since the last call, which resets them: Parley's
 * from that scrape (prom-client resets its monitor on every scrape), the load workers' from their own monitors.
 */
async function probe(ctx: Context): Promise<{ delays: { server: LoopDelay; clients: LoopDelay }; metrics: string }> {
  const [metrics, workers] = await Promise.all([
    ctx.server!.metrics(),
    Promise.all(ctx.workers.map((w) => w.call<LoopDelay>("loopDelay", {}, 30_000))),
  ]);
  const lag = parseMetrics(metrics, ["nodejs_eventloop_lag_p99_seconds", "nodejs_eventloop_lag_max_seconds"]);
  return {
    delays: {
      server: { p99: round((lag["nodejs_eventloop_lag_p99_seconds"] ?? NaN) * 1000, 1), max: round((lag["nodejs_eventloop_lag_max_seconds"] ?? NaN) * 1000, 1) },
      clients: { p99: round(Math.max(...workers.map((d) => d.p99)), 1), max: round(Math.max(...workers.map((d) => d.max)), 1) },
    },
    metrics,
  };
}

/** Parley's send statements (group commit) between two /metrics scrapes: how many, how full, how long. */
function sendStatements(before: string, after: string): SendStatements {
  const sends = (text: string) => parseMetrics(text, ["parley_send_statement_sends_sum", "parley_send_statement_sends_count"]);
  const [b, a] = [sends(before), sends(after)];
  const count = (a["parley_send_statement_sends_count"] ?? 0) - (b["parley_send_statement_sends_count"] ?? 0);
  const total = (a["parley_send_statement_sends_sum"] ?? 0) - (b["parley_send_statement_sends_sum"] ?? 0);
  const name = "parley_send_statement_seconds";
  return { count, meanSends: round(total / Math.max(1, count), 1), duration: bucketQuantiles(histogramBuckets(before, name), histogramBuckets(after, name)) };
}

/** One load phase with deliveries: send, wait for the stragglers, count and time what arrived. */
async function deliveryPhase(
  ctx: Context, tenant: string, chats: Chat[], label: string, phase: string,
  load: { mode: "rate"; rate: number } | { mode: "closed"; concurrency: number }, durationMs: number, via: Via = "grpc",
  protocol: SendProtocol = "grpc",
): Promise<PhaseResult> {
  const members = new Map(chats.map((c) => [c.id, c.members.length]));
  // Start from an idle server: requests abandoned by the previous phase's clients may still be running.
  const settleMs = await ctx.waitServerIdle(ctx.plan.settleMaxMs);
  if (settleMs > 1500) ctx.log(`  waited ${settleMs} ms for the server to go idle`);
  await ctx.startWindow();
  const before = await probe(ctx);
  const sent = await sendPhase(ctx, via, {
    baseUrl: ctx.server!.url,
    tenant,
    chats,
    phase,
    mode: load.mode,
    rate: load.mode === "rate" ? load.rate : 0,
    concurrency: load.mode === "closed" ? load.concurrency : 0,
    durationMs,
    maxInFlight: 1000,
    textBytes: ctx.plan.textBytes,
    connections: ctx.plan.senderConnections,
    timeoutMs: 10_000,
    keepKey: tenant,
    protocol,
  });
  const usage = await ctx.stopWindow();
  const after = await probe(ctx);
  const loopDelay = after.delays;
  const statements = sendStatements(before.metrics, after.metrics);
  let expected = 0;
  for (const [chatId, n] of Object.entries(sent.acceptedPerChat)) expected += n * (members.get(chatId) ?? 0);
  ctx.log(`  ${label}: sent (${sent.accepted} accepted), waiting for deliveries`);

  // Drain: until everything expected arrived, or nothing new for quietMs, or drainMaxMs.
  const drainStart = Date.now();
  let last = -1;
  let lastChange = Date.now();
  for (;;) {
    const counts = await Promise.all(ctx.receivers.map((w) => w.call<Record<string, number>>("counts", { phases: [phase] }, 30_000)));
    const received = counts.reduce((a, c) => a + (c[phase] ?? 0), 0);
    if (received >= expected) break;
    if (received !== last) {
      last = received;
      lastChange = Date.now();
    }
    if (Date.now() - lastChange > ctx.plan.quietMs || Date.now() - drainStart > ctx.plan.drainMaxMs) break;
    await sleep(200);
  }
  const a = await account(ctx, chats, phase, sent.acceptedChats);
  const { hist, duplicates, outOfOrder, lastDelivery, received, lost, incompleteMessages, deliveriesOfFailedSends } = a;
  const seconds = sent.elapsedMs / 1000;
  const deliveryWindow = (Math.max(sent.sendEnd, lastDelivery) - sent.started) / 1000;
  const result: PhaseResult = {
    label,
    offered: (load.mode === "rate" ? `${load.rate}/s` : `saturation (closed loop, ${load.concurrency} concurrent sends)`) +
      (protocol === "connect" ? ", SendMessage over the Connect protocol" : ""),
    offeredRate: load.mode === "rate" ? load.rate : null,
    seconds: round(seconds, 2),
    attempted: sent.attempted,
    accepted: sent.accepted,
    acceptedPerSecond: round(sent.acceptedPerSecond),
    shed: sent.shed,
    sendErrors: sent.errors,
    expectedDeliveries: expected,
    received,
    duplicates,
    outOfOrder,
    lost,
    incompleteMessages,
    deliveriesOfFailedSends,
    deliveriesPerSecond: round((received + deliveriesOfFailedSends) / Math.max(0.001, deliveryWindow)),
    drainMs: Math.max(0, Math.round(lastDelivery - sent.sendEnd)),
    latency: hist.summary(),
    sendLatency: summary(sent.sendLatency),
    perSecondAccepted: sent.perSecond,
    usage,
    loopDelay,
    sendStatements: statements,
    lostAtPhaseEnd: lost,
  };
  pendingAccounts.set(result, { phase, acceptedChats: sent.acceptedChats });
  ctx.log(
    `  ${label}: offered ${result.offered}, accepted ${result.acceptedPerSecond}/s, deliveries ${result.deliveriesPerSecond}/s, ` +
      `p50/p99/p99.9 ${result.latency.p50}/${result.latency.p99}/${result.latency.p999} ms, lost ${result.lost}, dup ${duplicates}, out of order ${outOfOrder}, ` +
      `errors ${JSON.stringify(sent.errors)}, shed ${sent.shed}, server CPU ${usage?.groups.server?.cpuPercent}%, machine ${usage?.machineCpuPercent}%, ` +
      `send statements ${statements.count} (mean ${statements.meanSends} sends, p50 ${statements.duration.p50}, p99 ${statements.duration.p99})`,
  );
  return result;
}

/** Per phase: what is needed to count its deliveries again at the end of the scenario. */
const pendingAccounts = new WeakMap<PhaseResult, { phase: string; acceptedChats: string }>();

/** Counts one phase's deliveries from the receivers' per-message tallies. */
async function account(ctx: Context, chats: Chat[], phase: string, acceptedChatsB64: string) {
  const stats = await receiverStats(ctx, [phase], false, true);
  const hist = new Histogram();
  let duplicates = 0;
  let outOfOrder = 0;
  let lastDelivery = 0;
  for (const s of stats) {
    const p = s.phases[phase];
    if (!p) continue;
    hist.merge(p.hist);
    duplicates += p.dups;
    outOfOrder += p.outOfOrder;
    lastDelivery = Math.max(lastDelivery, p.last);
  }
  // Per message: every accepted one must have reached each member of its chat exactly once.
  const acceptedChats = u16(acceptedChatsB64);
  const perMessage = stats.map((s) => u16(s.phases[phase]?.perMessage));
  const upTo = Math.max(acceptedChats.length, ...perMessage.map((p) => p.length));
  let received = 0;
  let lost = 0;
  let incompleteMessages = 0;
  let deliveriesOfFailedSends = 0;
  for (let i = 0; i < upTo; i++) {
    let got = 0;
    for (const p of perMessage) got += p[i] ?? 0;
    const chatIndex = acceptedChats[i] ?? 0;
    if (chatIndex === 0) {
      deliveriesOfFailedSends += got;
      continue;
    }
    const want = chats[chatIndex - 1]!.members.length;
    received += Math.min(got, want);
    if (got < want) {
      lost += want - got;
      incompleteMessages++;
    }
  }
  return { hist, duplicates, outOfOrder, lastDelivery, received, lost, incompleteMessages, deliveriesOfFailedSends };
}

/**
 * End of a scenario: waits (bounded) until every member has every committed message, then counts each
 * phase again, so deliveries that arrived after a phase's own drain window count as late, not lost.
 */
async function finalDrain(ctx: Context, tenant: string, chats: Chat[], phases: PhaseResult[]): Promise<{ waitedMs: number; complete: boolean }> {
  const sql = ctx.bench(1);
  let expected = 0;
  try {
    const rows = await sql`SELECT id::text AS id, last_sequence::int AS last FROM chats WHERE tenant_id = ${tenant}`;
    const last = new Map(rows.map((r) => [r.id as string, r.last as number]));
    for (const chat of chats) expected += chat.members.length * (last.get(chat.id) ?? 0);
  } finally {
    await sql.end({ timeout: 5 });
  }
  const started = Date.now();
  const maxMs = ctx.plan.quick ? 15_000 : 60_000;
  let previous = -1;
  let changed = Date.now();
  let delivered = 0;
  for (;;) {
    const totals = await Promise.all(ctx.receivers.map((w) => w.call<number>("delivered", {}, 30_000)));
    delivered = totals.reduce((a, b) => a + b, 0);
    if (delivered >= expected) break;
    if (delivered !== previous) {
      previous = delivered;
      changed = Date.now();
    }
    if (Date.now() - changed > 5000 || Date.now() - started > maxMs) break;
    await sleep(250);
  }
  const waitedMs = Date.now() - started;
  if (waitedMs > 1000) ctx.log(`  waited ${waitedMs} ms for the last deliveries (${delivered}/${expected})`);
  for (const p of phases) {
    const pending = pendingAccounts.get(p);
    if (!pending) continue;
    const a = await account(ctx, chats, pending.phase, pending.acceptedChats);
    p.lost = a.lost;
    p.incompleteMessages = a.incompleteMessages;
    p.lateDeliveries = a.received - p.received;
    p.received = a.received;
    p.duplicates = a.duplicates;
    p.outOfOrder = a.outOfOrder;
    p.deliveriesOfFailedSends = a.deliveriesOfFailedSends;
    p.latency = a.hist.summary();
  }
  return { waitedMs, complete: delivered >= expected };
}

export interface Verification {
  accepted: number;
  found: number;
  mismatched: number;
  missing: string[];
  tenantRows: number;
  chats: number;
  sequenceProblems: number;
  /** Deliveries expected over the whole scenario (members × last sequence, every member subscribed throughout). */
  expectedDeliveries: number;
  receivedDeliveries: number;
  lostDeliveries: number;
}

async function verifyScenario(ctx: Context, tenant: string, chats: Chat[], via: Via = "grpc"): Promise<{ verification: Verification; receivers: ReturnType<typeof mergeTotals> }> {
  // Each worker that sent checks the messages it kept; the tenant-wide figures are the same from any of them.
  const sentBy = via === "hub" ? ctx.receivers : [ctx.sender];
  const checks = await Promise.all(sentBy.map((worker) => worker.call<{
    accepted: number; found: number; mismatched: number; missing: string[]; tenantRows: number; chats: number;
    sequenceProblems: number; lastSequences: Record<string, number>;
  }>("verify", { databaseUrl: ctx.databaseUrl, tenant, keepKey: tenant }, 300_000)));
  const v = {
    ...checks[0]!,
    accepted: checks.reduce((a, c) => a + c.accepted, 0),
    found: checks.reduce((a, c) => a + c.found, 0),
    mismatched: checks.reduce((a, c) => a + c.mismatched, 0),
    missing: checks.flatMap((c) => c.missing).slice(0, 5),
  };
  const stats = await receiverStats(ctx, [], true);
  let expected = 0;
  for (const chat of chats) expected += chat.members.length * (v.lastSequences[chat.id] ?? 0);
  let received = 0;
  for (const s of stats) for (const n of Object.values(s.byChat ?? {})) received += n;
  await Promise.all(sentBy.map((worker) => worker.call("forget", { keepKey: tenant }, 30_000)));
  const verification: Verification = {
    accepted: v.accepted, found: v.found, mismatched: v.mismatched, missing: v.missing, tenantRows: v.tenantRows,
    chats: v.chats, sequenceProblems: v.sequenceProblems,
    expectedDeliveries: expected, receivedDeliveries: received, lostDeliveries: Math.max(0, expected - received),
  };
  ctx.log(`  verify: ${v.found}/${v.accepted} accepted messages in PostgreSQL (${v.mismatched} differ), ${v.tenantRows} rows in the tenant, ` +
    `${v.sequenceProblems} chats with sequence gaps; deliveries ${received}/${expected}`);
  return { verification, receivers: mergeTotals(stats) };
}

export interface FanoutScenario {
  via?: Via;
  chatSize: number;
  clients: number;
  chats: number;
  setup: { createChatsMs: number; subscribeMs: number; ready: number; failed: number };
  phases: PhaseResult[];
  /** End of the scenario: how long it took until every member had every committed message. */
  finalDrain?: { waitedMs: number; complete: boolean };
  verification?: Verification;
  receivers?: ReturnType<typeof mergeTotals>;
  server?: ServerReport;
}

/** Scenarios (a) and (b), and over the hub (g) and (h): `clients` users in chats of `chatSize`, every member receiving bodies. */
export async function fanoutScenario(ctx: Context, key: string, chatSize: number, clients: number, rates: number[], via: Via = "grpc"): Promise<FanoutScenario> {
  const tenant = `bench-${key}-${hex()}`;
  await ctx.startServer(key);
  try {
    const users = Array.from({ length: clients }, (_, i) => `user-${i}`);
    const groups: string[][] = [];
    for (let i = 0; i < users.length; i += chatSize) groups.push(users.slice(i, i + chatSize));
    let t0 = performance.now();
    const chats = await createChats(ctx, tenant, groups, `chat of ${chatSize}`);
    const createChatsMs = Math.round(performance.now() - t0);
    t0 = performance.now();
    const sub = await subscribeAll(ctx, tenant, users, { via });
    ctx.log(`  ${chats.length} chats of ${chatSize}, ${sub.ready}/${clients} ${via === "hub" ? "hub connections" : "Subscribe streams"} ready (${sub.failed} failed) in ${Math.round(performance.now() - t0)} ms`);
    const result: FanoutScenario = {
      via, chatSize, clients, chats: chats.length,
      setup: { createChatsMs, subscribeMs: Math.round(performance.now() - t0), ready: sub.ready, failed: sub.failed },
      phases: [],
    };
    await deliveryPhase(ctx, tenant, chats, "warm-up", `${key}warm`, { mode: "rate", rate: Math.min(200, rates[0]! / 2) }, ctx.plan.warmupMs, via);
    for (const rate of rates) {
      result.phases.push(await deliveryPhase(ctx, tenant, chats, `${rate}/s`, `${key}r${rate}`, { mode: "rate", rate }, ctx.plan.phaseMs, via));
    }
    result.phases.push(await deliveryPhase(ctx, tenant, chats, "saturation", `${key}sat`, { mode: "closed", concurrency: ctx.plan.saturationConcurrency }, ctx.plan.phaseMs, via));
    if (via === "grpc") {
      result.phases.push(await deliveryPhase(ctx, tenant, chats, "saturation, Connect protocol", `${key}satc`, { mode: "closed", concurrency: ctx.plan.saturationConcurrency }, ctx.plan.phaseMs, via, "connect"));
    }
    result.finalDrain = await finalDrain(ctx, tenant, chats, result.phases);
    const checked = await verifyScenario(ctx, tenant, chats, via);
    result.verification = checked.verification;
    result.receivers = checked.receivers;
    return result;
  } finally {
    await closeAll(ctx).catch((e) => ctx.log(`  cleanup: ${e}`));
    const report = await ctx.stopServer();
    if (report) lastServerReport.set(key, report);
  }
}

/** Server reports by scenario key (filled even when a scenario throws). */
export const lastServerReport = new Map<string, ServerReport>();

// ---------------------------------------------------------------------------------------------
// (c) fan-out 1

export interface Fanout1Scenario {
  chats: number;
  runs: PhaseResult[];
  best: PhaseResult | undefined;
  verification?: Verification;
  receivers?: ReturnType<typeof mergeTotals>;
}

export async function fanout1Scenario(ctx: Context): Promise<Fanout1Scenario> {
  const tenant = `bench-c-${hex()}`;
  await ctx.startServer("c");
  try {
    const users = Array.from({ length: 1000 }, (_, i) => `solo-${i}`);
    const chats = await createChats(ctx, tenant, users.map((u) => [u]), "solo");
    const sub = await subscribeAll(ctx, tenant, users);
    ctx.log(`  ${chats.length} chats of 1, ${sub.ready} streams ready`);
    await deliveryPhase(ctx, tenant, chats, "warm-up", "cwarm", { mode: "rate", rate: 200 }, ctx.plan.warmupMs);
    const runs: PhaseResult[] = [];
    for (const protocol of ["grpc", "connect"] as const) {
      for (const concurrency of ctx.plan.fanout1Concurrency) {
        const label = `saturation, ${concurrency} concurrent${protocol === "connect" ? ", Connect protocol" : ""}`;
        runs.push(await deliveryPhase(ctx, tenant, chats, label, `csat${concurrency}${protocol[0]}`, { mode: "closed", concurrency }, ctx.plan.phaseMs, "grpc", protocol));
      }
    }
    await finalDrain(ctx, tenant, chats, runs);
    const best = [...runs].sort((a, b) => b.acceptedPerSecond - a.acceptedPerSecond)[0];
    const checked = await verifyScenario(ctx, tenant, chats);
    return { chats: chats.length, runs, best, verification: checked.verification, receivers: checked.receivers };
  } finally {
    await closeAll(ctx).catch((e) => ctx.log(`  cleanup: ${e}`));
    const report = await ctx.stopServer();
    if (report) lastServerReport.set("c", report);
  }
}

// ---------------------------------------------------------------------------------------------
// (d) idle streams

export interface IdleMeasure {
  label: string;
  streams: number;
  connections: number;
  ready: number;
  failed: number;
  baseRssMiB: number;
  rssMiB: number;
  /** (RSS with the streams − baseline) / streams. */
  perStreamKiB: number;
  perStreamHeapKiB: number | null;
  /** Between this level and the previous one: (RSS difference) / (streams added). */
  marginalKiB: number | null;
  marginalHeapKiB: number | null;
  rssBytes: number;
  heapUsedBytes: number | null;
  serverCpuPercentIdle: number | null;
}

export interface IdleStreams {
  /** One HTTP/2 connection per stream. */
  dedicated?: IdleMeasure;
  /** Many streams on few HTTP/2 connections, growing. */
  multiplexed: IdleMeasure[];
}

export interface IdleScenario extends IdleStreams {
  /** The same streams held by bench/idle-floor-server.ts with node:http2 alone: what no Subscribe stream can go below. */
  floor?: IdleStreams;
  /** The same with a bare Connect router in front: what any Subscribe stream served through Connect costs. */
  connectFloor?: IdleStreams;
  /** SignalR hub connections (one WebSocket each), growing like the multiplexed streams. */
  hub?: IdleMeasure[];
  /** Heap snapshots before and after opening streams on a third server: what the live heap per stream is made of. */
  heap?: { streams: number; totalBytesPerStream: number; rows: HeapDiffRow[] } | { error: string };
}

const HTTP2_FLOOR: StandIn = { script: "bench/idle-floor-server.ts", env: { IDLE_FLOOR: "http2" } };
const CONNECT_FLOOR: StandIn = { script: "bench/idle-floor-server.ts", env: { IDLE_FLOOR: "connect" } };

export async function idleScenario(ctx: Context): Promise<IdleScenario> {
  const tenant = `bench-d-${hex()}`;
  const max = Math.max(...ctx.plan.idleStreams, ctx.plan.dedicatedConnections);
  const users = Array.from({ length: max }, (_, i) => `idle-${i}`);
  const groups: string[][] = [];
  for (let i = 0; i < users.length; i += 10) groups.push(users.slice(i, i + 10));
  const result: IdleScenario = { multiplexed: [] };

  const measure = async (label: string, base: { rssBytes: number; heapUsedBytes: number | undefined }, streams: number, connections: number, ready: number, failed: number, previous?: IdleMeasure): Promise<IdleMeasure> => {
    await sleep(ctx.plan.quick ? 2000 : 5000);
    await ctx.startWindow();
    await sleep(2000);
    const usage = await ctx.stopWindow();
    const now = await ctx.serverMemory();
    const m: IdleMeasure = {
      label, streams, connections, ready, failed,
      baseRssMiB: round(base.rssBytes / MIB), rssMiB: round(now.rssBytes / MIB),
      perStreamKiB: round((now.rssBytes - base.rssBytes) / streams / 1024, 2),
      perStreamHeapKiB: now.heapUsedBytes !== undefined && base.heapUsedBytes !== undefined ? round((now.heapUsedBytes - base.heapUsedBytes) / streams / 1024, 2) : null,
      marginalKiB: previous ? round((now.rssBytes - previous.rssBytes) / (streams - previous.streams) / 1024, 2) : null,
      marginalHeapKiB: previous && previous.heapUsedBytes !== null && now.heapUsedBytes !== undefined
        ? round((now.heapUsedBytes - previous.heapUsedBytes) / (streams - previous.streams) / 1024, 2) : null,
      rssBytes: now.rssBytes,
      heapUsedBytes: now.heapUsedBytes ?? null,
      serverCpuPercentIdle: usage?.groups.server?.cpuPercent ?? null,
    };
    ctx.log(`  ${label}: ${ready}/${streams} ready on ${connections} connections; RSS ${m.baseRssMiB} → ${m.rssMiB} MiB = ${m.perStreamKiB} KiB per stream (heap ${m.perStreamHeapKiB} KiB)` +
      (previous ? `; marginal ${m.marginalKiB} KiB RSS, ${m.marginalHeapKiB} KiB heap per added stream` : ""));
    return m;
  };
  const warmUp = async () => {
    await subscribeAll(ctx, tenant, users.slice(0, 200), { connectionsPerWorker: 2, reopen: false });
    await Promise.all(ctx.receivers.map((w) => w.call("closeStreams", {}, 30_000)));
    await sleep(ctx.plan.quick ? 1000 : 3000);
  };

  /** One HTTP/2 connection per stream (what a fleet of phones looks like), then many streams multiplexed on few connections, growing 1,000 → 10,000, each on a fresh server (Parley, or a stand-in). */
  const idleStreams = async (standIn?: StandIn, labelSuffix = ""): Promise<IdleStreams> => {
    const out: IdleStreams = { multiplexed: [] };
    const suffix = standIn ? `-floor-${standIn.env?.IDLE_FLOOR}` : "";
    await ctx.startServer(`d-dedicated${suffix}`, true, standIn);
    try {
      await warmUp();
      const base = await ctx.serverMemory();
      const n = ctx.plan.dedicatedConnections;
      const sub = await subscribeAll(ctx, tenant, users.slice(0, n), { dedicated: true, reopen: false });
      out.dedicated = await measure(`${n} streams, one connection each${labelSuffix}`, base, n, n, sub.ready, sub.failed);
    } finally {
      await closeAll(ctx).catch((e) => ctx.log(`  cleanup: ${e}`));
      const report = await ctx.stopServer();
      if (report) lastServerReport.set(`d-dedicated${suffix}`, report);
    }

    await ctx.startServer(`d-multiplexed${suffix}`, true, standIn);
    try {
      await warmUp();
      const base = await ctx.serverMemory();
      let open = 0;
      let connections = 0;
      let ready = 0;
      let failed = 0;
      for (const target of ctx.plan.idleStreams) {
        const add = users.slice(open, target);
        const perWorker = Math.max(1, Math.ceil(add.length / ctx.receivers.length / 250));
        const sub = await subscribeAll(ctx, tenant, add, { connectionsPerWorker: perWorker, reopen: false });
        open = target;
        connections += perWorker * ctx.receivers.length;
        ready += sub.ready;
        failed += sub.failed;
        out.multiplexed.push(await measure(`${target} streams multiplexed${labelSuffix}`, base, target, connections, ready, failed, out.multiplexed.at(-1)));
      }
    } finally {
      await closeAll(ctx).catch((e) => ctx.log(`  cleanup: ${e}`));
      const report = await ctx.stopServer();
      if (report) lastServerReport.set(`d-multiplexed${suffix}`, report);
    }
    return out;
  };

  await ctx.startServer("d-chats");
  try {
    await createChats(ctx, tenant, groups, "idle");
  } finally {
    await ctx.stopServer();
  }
  Object.assign(result, await idleStreams());
  result.floor = await idleStreams(HTTP2_FLOOR, ", node:http2 floor");
  result.connectFloor = await idleStreams(CONNECT_FLOOR, ", Connect floor");

  // Hub connections: one WebSocket each, on another fresh server.
  const openHubs = (add: string[]) => subscribeAll(ctx, tenant, add, { via: "hub" });
  await ctx.startServer("d-hub", true);
  try {
    await openHubs(users.slice(0, 200));
    await closeAll(ctx);
    await sleep(ctx.plan.quick ? 1000 : 3000);
    const base = await ctx.serverMemory();
    result.hub = [];
    let open = 0;
    let ready = 0;
    let failed = 0;
    for (const target of ctx.plan.idleStreams) {
      const opened = await openHubs(users.slice(open, target));
      open = target;
      ready += opened.ready;
      failed += opened.failed;
      result.hub.push(await measure(`${target} hub connections`, base, target, target, ready, failed, result.hub.at(-1)));
    }
  } finally {
    await closeAll(ctx).catch((e) => ctx.log(`  cleanup: ${e}`));
    const report = await ctx.stopServer();
    if (report) lastServerReport.set("d-hub", report);
  }

  // What one idle stream's heap is made of (snapshots distort RSS, hence a server of its own).
  await ctx.startServer("d-heap", true);
  try {
    await warmUp();
    const n = ctx.plan.heapSnapshotStreams;
    const before = path.join(ctx.tmpDir, "idle-before.heapsnapshot");
    const after = path.join(ctx.tmpDir, "idle-after.heapsnapshot");
    await ctx.server!.heapSnapshot(before);
    const sub = await subscribeAll(ctx, tenant, users.slice(0, n), { reopen: false });
    await sleep(2000);
    await ctx.server!.heapSnapshot(after);
    const diff = heapDiff(before, after, sub.ready, 25);
    result.heap = { streams: sub.ready, totalBytesPerStream: diff.totalBytesPerUnit, rows: diff.rows };
    ctx.log(`  heap snapshots: ${diff.totalBytesPerUnit} bytes of live heap per stream; top: ${diff.rows.slice(0, 5).map((r) => `${r.what} ${r.bytesPerUnit} B`).join(", ")}`);
    fs.rmSync(before, { force: true });
    fs.rmSync(after, { force: true });
  } catch (error) {
    result.heap = { error: String(error) };
  } finally {
    await closeAll(ctx).catch((e) => ctx.log(`  cleanup: ${e}`));
    const report = await ctx.stopServer();
    if (report) lastServerReport.set("d-heap", report);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// (e) history

/** Cumulative buckets of parley_rpc_duration_seconds for one method (le → count). */
function rpcBuckets(text: string, method: string): Map<number, number> {
  return histogramBuckets(text, "parley_rpc_duration_seconds", [`method="${method}"`, 'code="ok"']);
}

/** Cumulative buckets (le → count) of a histogram, of the series whose labels contain every given `name="value"`. */
function histogramBuckets(text: string, name: string, labels: string[] = []): Map<number, number> {
  const out = new Map<number, number>();
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}_bucket`) || !labels.every((label) => line.includes(label))) continue;
    const le = /le="([^"]+)"/.exec(line)?.[1];
    if (le) out.set(le === "+Inf" ? Infinity : Number(le), Number(line.split(" ").at(-1)));
  }
  return out;
}

/** Server-side (handler) latency quantiles as bucket upper bounds in ms, from two /metrics scrapes. */
function bucketQuantiles(before: Map<number, number>, after: Map<number, number>): { p50: string; p99: string } {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const total = (after.get(Infinity) ?? 0) - (before.get(Infinity) ?? 0);
  const at = (q: number) => {
    for (const le of bounds) {
      if ((after.get(le) ?? 0) - (before.get(le) ?? 0) >= q * total) return le === Infinity ? "> 60 s" : `≤ ${le * 1000} ms`;
    }
    return "–";
  };
  return total > 0 ? { p50: at(0.5), p99: at(0.99) } : { p50: "–", p99: "–" };
}

export interface HistoryMeasure {
  /** Server-side handler time (Parley's RPC histogram, bucket bounds) over all sizes' queries, excluding transport and client. */
  serverSide?: { p50: string; p99: string };
  messages: number;
  insertSeconds: number;
  insertRowsPerSecond: number;
  api: LatencySummary;
  rawSql: LatencySummary;
  wrongPages: number;
  plan: string[];
}

/**
 * Every chat is filled first, then vacuumed and checkpointed, then all are queried interleaved: so the
 * large chat is not measured while PostgreSQL is still busy with its bulk insert, and every size meets
 * the same machine.
 */
export async function historyScenario(ctx: Context): Promise<HistoryMeasure[]> {
  const tenant = `bench-e-${hex()}`;
  await ctx.startServer("e");
  const sql = ctx.bench(2);
  try {
    const chats = await createChats(ctx, tenant, ctx.plan.historySizes.map(() => ["reader"]), "history");
    const filled: { n: number; chatId: string; insertSeconds: number }[] = [];
    for (let k = 0; k < chats.length; k++) {
      const n = ctx.plan.historySizes[k]!;
      const chatId = chats[k]!.id;
      const started = performance.now();
      const base = new Date(Date.now() - n - 60_000).toISOString();
      const chunk = 250_000;
      for (let from = 1; from <= n; from += chunk) {
        const to = Math.min(n, from + chunk - 1);
        await sql`
          INSERT INTO messages (tenant_id, chat_id, sequence, id, sender_id, text, create_time)
          SELECT ${tenant}, ${chatId}::uuid, g, gen_random_uuid(), 'writer-' || (g % 10),
                 'history message ' || g || ' ' || repeat('h', 60), ${base}::timestamptz + g * interval '1 millisecond'
          FROM generate_series(${from}::bigint, ${to}::bigint) AS g`;
      }
      await sql`
        UPDATE chats SET last_sequence = ${n}, last_message_time = ${base}::timestamptz + ${n} * interval '1 millisecond',
          activity_time = ${base}::timestamptz + ${n} * interval '1 millisecond'
        WHERE tenant_id = ${tenant} AND id = ${chatId}`;
      const insertSeconds = (performance.now() - started) / 1000;
      ctx.log(`  bulk-inserted ${n} messages in ${round(insertSeconds)} s`);
      filled.push({ n, chatId, insertSeconds });
    }
    await sql`VACUUM ANALYZE messages`;
    await sql`CHECKPOINT`;
    await ctx.startWindow();
    const method = "parley.v1.MessageService/ListMessages";
    const bucketsBefore = rpcBuckets(await ctx.server!.metrics(), method);
    const measured = await ctx.sender.call<{ api: HistogramData; raw: HistogramData; wrongPages: number; plan: string[] }[]>("history", {
      baseUrl: ctx.server!.url, databaseUrl: ctx.databaseUrl, tenant, user: "reader",
      chats: filled.map((f) => ({ chatId: f.chatId, lastSequence: f.n })),
      queries: ctx.plan.historyQueries, warmup: 20, pageSize: 50,
    }, 300_000);
    await ctx.stopWindow();
    const serverSide = bucketQuantiles(bucketsBefore, rpcBuckets(await ctx.server!.metrics(), method));
    return filled.map((f, k) => {
      const h = measured[k]!;
      const m: HistoryMeasure = {
        serverSide,
        messages: f.n, insertSeconds: round(f.insertSeconds), insertRowsPerSecond: Math.round(f.n / f.insertSeconds),
        api: summary(h.api), rawSql: summary(h.raw), wrongPages: h.wrongPages, plan: h.plan,
      };
      ctx.log(`  ListMessages last 50 of ${f.n}: p50 ${m.api.p50} ms, p99 ${m.api.p99} ms (raw SQL p50 ${m.rawSql.p50}, p99 ${m.rawSql.p99}); wrong pages ${m.wrongPages}`);
      return m;
    });
  } finally {
    await sql.end({ timeout: 5 });
    await ctx.sender.call("closeSenders", {}, 30_000).catch(() => {});
    const report = await ctx.stopServer();
    if (report) lastServerReport.set("e", report);
  }
}

// ---------------------------------------------------------------------------------------------
// (f) raw ceilings

export interface RawCeilings {
  pgInsert?: { perSecond: number; latency: LatencySummary; concurrency: number; pool: number; usage?: WindowUsage };
  /** Parley's MessageStore.send (the SQL of SendMessage) straight from postgres.js. */
  pgSendTx?: { perSecond: number; latency: LatencySummary; concurrency: number; pool: number; usage?: WindowUsage; errors: number; firstError?: string };
  nats?: { perSecond: number; latencyRate: number; latency: LatencySummary; lost: number; usage?: WindowUsage };
  ws?: { clients: number; messagesPerSecond: number; deliveriesPerSecond: number; latency: LatencySummary; usage?: WindowUsage };
  errors: string[];
}

export async function rawCeilings(ctx: Context): Promise<RawCeilings> {
  const out: RawCeilings = { errors: [] };
  const ms = ctx.plan.rawMs;
  // The Parley schema, for the transaction baseline: a short-lived server applies the migrations.
  await ctx.startServer("f-migrate");
  await ctx.stopServer();

  try {
    await ctx.startWindow();
    const r = await ctx.sender.call<{ perSecond: number; latency: HistogramData }>("pgInsert", { databaseUrl: ctx.databaseUrl, durationMs: ms, concurrency: 64, pool: 10 }, ms + 60_000);
    out.pgInsert = { perSecond: round(r.perSecond), latency: summary(r.latency), concurrency: 64, pool: 10, usage: await ctx.stopWindow() };
    ctx.log(`  PostgreSQL single-row INSERTs: ${out.pgInsert.perSecond}/s (p50 ${out.pgInsert.latency.p50} ms)`);
  } catch (error) {
    out.errors.push(`pgInsert: ${error}`);
  }
  try {
    await ctx.startWindow();
    const r = await ctx.sender.call<{ perSecond: number; latency: HistogramData; errors: number; firstError?: string }>("pgStoreSend", {
      databaseUrl: ctx.databaseUrl, serverRoot: ctx.serverRoot, durationMs: ms, concurrency: 64, pool: 20, chats: 1000,
    }, ms + 60_000);
    out.pgSendTx = { perSecond: round(r.perSecond), latency: summary(r.latency), concurrency: 64, pool: 20, usage: await ctx.stopWindow(), errors: r.errors, firstError: r.firstError };
    ctx.log(`  Parley's MessageStore.send straight from postgres.js: ${out.pgSendTx.perSecond}/s (p50 ${out.pgSendTx.latency.p50} ms, ${r.errors} errors${r.firstError ? `: ${r.firstError}` : ""})`);
  } catch (error) {
    out.errors.push(`pgSendTx: ${error}`);
  }
  try {
    await ctx.startWindow();
    const r = await ctx.sender.call<{ perSecond: number; latency: HistogramData; latencyRate: number; latencySent: number; latencyReceived: number }>(
      "natsBench", { natsUrl: ctx.natsUrl, durationMs: ms, payloadBytes: 250, latencyRate: 5000, latencyMs: Math.min(ms, 5000) }, 2 * ms + 60_000,
    );
    out.nats = { perSecond: round(r.perSecond), latencyRate: r.latencyRate, latency: summary(r.latency), lost: r.latencySent - r.latencyReceived, usage: await ctx.stopWindow() };
    ctx.log(`  NATS publish→subscribe: ${out.nats.perSecond} msgs/s; at ${r.latencyRate}/s p50 ${out.nats.latency.p50} ms, p99 ${out.nats.latency.p99} ms`);
  } catch (error) {
    out.errors.push(`nats: ${error}`);
  }

  const wsServer = new WorkerHandle("ws-broadcast", path.join(ctx.root, "bench/ws-broadcast-server.ts"), {});
  try {
    const { port } = await wsServer.next<{ port: number }>("listening", 30_000);
    const clients = 1000;
    const per = Math.ceil(clients / ctx.receivers.length);
    await Promise.all(ctx.receivers.map((w, i) => w.call("wsConnect", { url: `ws://127.0.0.1:${port}`, n: Math.min(per, clients - i * per), timeoutMs: 20_000 }, 60_000)));
    await wsServer.call("run", { durationMs: 1000, payloadBytes: 250, phase: "wswarm" }, 30_000);
    await sleep(500);
    await ctx.startWindow({ wsServer: [wsServer.pid] });
    const run = await wsServer.call<{ messages: number; deliveries: number; clients: number; ms: number }>("run", { durationMs: ms, payloadBytes: 250, phase: "ws" }, ms + 30_000);
    const usage = await ctx.stopWindow();
    await sleep(1000);
    const stats = await receiverStats(ctx, ["ws"]);
    const hist = new Histogram();
    let received = 0;
    let first = Number.POSITIVE_INFINITY;
    let last = 0;
    for (const s of stats) {
      const p = s.phases["ws"];
      if (!p) continue;
      hist.merge(p.hist);
      received += p.received;
      first = Math.min(first, p.first);
      last = Math.max(last, p.last);
    }
    out.ws = {
      clients: run.clients,
      messagesPerSecond: round(run.messages / (run.ms / 1000)),
      deliveriesPerSecond: round(received / Math.max(0.001, (last - first) / 1000)),
      latency: hist.summary(),
      usage,
    };
    ctx.log(`  ws broadcast to ${run.clients} clients: ${out.ws.deliveriesPerSecond} deliveries/s (p50 ${out.ws.latency.p50} ms, p99 ${out.ws.latency.p99} ms)`);
  } catch (error) {
    out.errors.push(`ws: ${error}`);
  } finally {
    await Promise.all(ctx.receivers.map((w) => w.call("wsClose", {}, 30_000).catch(() => {})));
    await Promise.all(ctx.receivers.map((w) => w.call("resetReceivers", {}, 30_000).catch(() => {})));
    await wsServer.stop();
  }
  return out;
}
