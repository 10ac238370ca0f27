/**
 * One client-load process, driven by bench/run.ts over IPC ({id, cmd, args} → {id, ok, result}).
 * It holds Subscribe streams (receivers), sends messages (open loop at a rate, or closed loop at a
 * concurrency), runs history queries and the raw PostgreSQL / NATS / WebSocket ceilings. gRPC clients
 * share a few HTTP/2 connections, many streams multiplexed on each; the bearer token goes in
 * each call's headers, so one connection carries many users. The measured calls (Subscribe, SendMessage,
 * ListMessages) use the lean client in lib/raw-grpc.ts (SendMessage over gRPC or, when asked, the
 * Connect protocol); set-up calls use Connect-es. Over the SignalR
 * hub (hubSubscribe) each user has its own WebSocket, which receives its events and carries its sends.
 */
import crypto from "node:crypto";
import path from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { pathToFileURL } from "node:url";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { SignJWT } from "jose";
import { connect as natsConnect } from "nats";
import postgres from "postgres";
import { v7 as uuidv7 } from "uuid";
import WebSocket from "ws";
import { ChatService } from "../gen/parley/v1/chat_pb.js";
import { MessageService } from "../gen/parley/v1/message_pb.js";
import { Histogram, type HistogramData } from "./lib/hist.js";
import { GrpcError, newestMessagesRequest, RawGrpc, readMessagePage, readNotification, sendMessageRequest, sentMessageId, subscribeRequest, type NotificationSummary } from "./lib/raw-grpc.js";

const workerName = process.argv[2] ?? "worker";
const secret = new TextEncoder().encode(process.env.BENCH_JWT_SECRET ?? "");
/** Wall-clock milliseconds with sub-millisecond resolution; comparable across processes on one machine. */
const clock = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
/**
 * This process's own stalls (its GC, its CPU share): a delivery is timed only when its event loop gets
 * to it. The same 10 ms timer as prom-client's monitor in Parley (report.ts subtracts it).
 */
const loopDelay = monitorEventLoopDelay({ resolution: 10 });
loopDelay.enable();

// ---------------------------------------------------------------------------------------------
// Connections and tokens

class Pool {
  readonly managers: Http2SessionManager[] = [];
  readonly chats: Client<typeof ChatService>[] = [];
  readonly messages: Client<typeof MessageService>[] = [];

  constructor(baseUrl: string, connections: number) {
    for (let i = 0; i < connections; i++) {
      // One session manager = one HTTP/2 connection; streams beyond the server's limit would queue.
      const manager = new Http2SessionManager(baseUrl, { idleConnectionTimeoutMs: 3_600_000 }, {
        settings: { initialWindowSize: 1 << 20 },
        peerMaxConcurrentStreams: 100_000,
      });
      const transport = createGrpcTransport({ baseUrl, sessionManager: manager, acceptCompression: [] });
      this.managers.push(manager);
      this.chats.push(createClient(ChatService, transport));
      this.messages.push(createClient(MessageService, transport));
    }
  }

  close(): void {
    for (const manager of this.managers) manager.abort();
  }
}

const tokens = new Map<string, string>();
async function bearer(tenant: string, user: string): Promise<string> {
  const key = `${tenant}\u0000${user}`;
  let token = tokens.get(key);
  if (!token) {
    token = await new SignJWT({ tid: tenant })
      .setProtectedHeader({ alg: "HS256" })
      .setSubject(user)
      .setIssuedAt()
      .setExpirationTime("2h")
      .sign(secret);
    token = `Bearer ${token}`;
    tokens.set(key, token);
  }
  return token;
}

function codeOf(error: unknown): string {
  if (error instanceof GrpcError || error instanceof HubError) return error.code;
  const code = ConnectError.from(error).code;
  return Code[code] ?? String(code);
}

// ---------------------------------------------------------------------------------------------
// Receivers

interface PhaseStats {
  received: number;
  dups: number;
  hist: Histogram;
  first: number;
  last: number;
  /** Deliveries per message number (the sender's counter in the text). */
  perMessage: Uint16Array;
  outOfOrder: number;
}
const phases = new Map<string, PhaseStats>();
function phaseStats(phase: string): PhaseStats {
  let stats = phases.get(phase);
  if (!stats) {
    stats = { received: 0, dups: 0, hist: new Histogram(), first: 0, last: 0, perMessage: new Uint16Array(1024), outOfOrder: 0 };
    phases.set(phase, stats);
  }
  return stats;
}

const totals = {
  messages: 0,
  dups: 0,
  /** Sequences still missing on a stream that never failed (computed when stats are read): silent loss. */
  silentGaps: 0,
  /** Sequences still missing on streams that were re-opened (the server closed them). */
  gapsAfterReopen: 0,
  /** Deliveries that arrived after a higher sequence of the same chat on the same stream (late, not lost). */
  outOfOrder: 0,
  /** Largest distance (highest sequence seen − late sequence) of an out-of-order delivery. */
  maxReorderDistance: 0,
  noBody: 0,
  heartbeats: 0,
  otherEvents: {} as Record<string, number>,
  streamErrors: {} as Record<string, number>,
  reopened: 0,
};

interface Stream {
  tenant: string;
  user: string;
  abort: AbortController;
  closed: boolean;
  failures: number;
  /** Per chat: highest sequence delivered, and the lower ones not delivered yet. */
  seen: Map<string, { max: number; missing: Set<number> }>;
  ready: Promise<boolean>;
}
let streams: Stream[] = [];
let receiverPools: RawGrpc[] = [];
/** Messages received per chat, summed over this worker's streams. */
const receivedByChat = new Map<string, number>();

function onNotification(stream: Stream, n: NotificationSummary): void {
  if (n.kind === "messageCreated") {
    const now = clock();
    const value = n;
    const sequence = value.sequence;
    let seen = stream.seen.get(value.chatId);
    if (!seen) stream.seen.set(value.chatId, (seen = { max: 0, missing: new Set() }));
    let duplicate = false;
    let late = false;
    if (sequence > seen.max) {
      for (let s = seen.max + 1; s < sequence; s++) seen.missing.add(s);
      seen.max = sequence;
    } else if (seen.missing.delete(sequence)) {
      late = true;
      totals.outOfOrder++;
      totals.maxReorderDistance = Math.max(totals.maxReorderDistance, seen.max - sequence);
    } else {
      duplicate = true;
    }
    totals.messages++;
    if (duplicate) totals.dups++;
    else receivedByChat.set(value.chatId, (receivedByChat.get(value.chatId) ?? 0) + 1);
    const text = value.text;
    if (!text) {
      totals.noBody++;
      return;
    }
    const a = text.indexOf("|");
    const b = text.indexOf("|", a + 1);
    const c = text.indexOf("|", b + 1);
    const stats = phaseStats(text.slice(0, a));
    if (duplicate) {
      stats.dups++;
      return;
    }
    if (late) stats.outOfOrder++;
    stats.received++;
    stats.hist.record(now - Number(text.slice(a + 1, b)));
    countMessage(stats, Number(text.slice(b + 1, c)));
    if (stats.first === 0) stats.first = now;
    stats.last = now;
  } else if (n.kind === "heartbeat") {
    totals.heartbeats++;
  } else if (n.kind !== "ready") {
    totals.otherEvents[n.kind] = (totals.otherEvents[n.kind] ?? 0) + 1;
  }
}

function countMessage(stats: PhaseStats, i: number): void {
  if (!Number.isInteger(i) || i < 0 || i > 50_000_000) return;
  if (i >= stats.perMessage.length) {
    const grown = new Uint16Array(Math.max(i + 1, stats.perMessage.length * 2));
    grown.set(stats.perMessage);
    stats.perMessage = grown;
  }
  stats.perMessage[i]! += 1;
}

const subscribePath = "/parley.v1.NotificationService/Subscribe";

function countStreamError(kind: string): void {
  totals.streamErrors[kind] = (totals.streamErrors[kind] ?? 0) + 1;
}

/** A stream not yet open, and the function that settles its `ready`. */
function newStream(tenant: string, user: string): { stream: Stream; markReady: (ok: boolean) => void } {
  let markReady: (ok: boolean) => void = () => {};
  const stream: Stream = {
    tenant, user, abort: new AbortController(), closed: false, failures: 0, seen: new Map(),
    ready: new Promise<boolean>((resolve) => (markReady = resolve)),
  };
  return { stream, markReady };
}

function openStream(pool: RawGrpc, tenant: string, user: string, includeMessages: boolean, reopen: boolean): Stream {
  const { stream, markReady } = newStream(tenant, user);
  const request = subscribeRequest(includeMessages);
  void (async () => {
    const authorization = await bearer(tenant, user);
    for (let attempt = 0; !stream.closed; attempt++) {
      const abort = new AbortController();
      stream.abort = abort;
      const error = await pool.serverStream(subscribePath, request, authorization, abort.signal, (bytes) => {
        const n = readNotification(bytes);
        if (n.kind === "ready") markReady(true);
        else onNotification(stream, n);
      });
      const failure = error?.code ?? "ended by server";
      if (stream.closed) break;
      stream.failures++;
      countStreamError(failure);
      markReady(false);
      if (!reopen) break;
      totals.reopened++;
      await sleep(Math.min(2000, 200 * (attempt + 1)));
    }
  })();
  return stream;
}

interface SubscribeArgs {
  baseUrl: string;
  tenant: string;
  users: string[];
  connections: number;
  includeMessages: boolean;
  reopen: boolean;
  batch: number;
  readyTimeoutMs: number;
}

async function subscribe(args: SubscribeArgs) {
  const pool = new RawGrpc(args.baseUrl, args.connections);
  receiverPools.push(pool);
  return openAll(args, (user) => openStream(pool, args.tenant, user, args.includeMessages, args.reopen));
}

/** Opens one stream per user, a batch at a time, each batch ready (or failed, or past the deadline) before the next. */
async function openAll(args: SubscribeArgs, open: (user: string) => Stream) {
  const started = performance.now();
  for (const user of args.users) await bearer(args.tenant, user);
  let ready = 0;
  let failed = 0;
  const deadline = Date.now() + args.readyTimeoutMs;
  for (let i = 0; i < args.users.length; i += args.batch) {
    const batch = args.users.slice(i, i + args.batch).map(open);
    streams.push(...batch);
    const timeout = sleep(Math.max(0, deadline - Date.now())).then(() => false);
    const results = await Promise.all(batch.map((s) => Promise.race([s.ready, timeout])));
    for (const ok of results) ok ? ready++ : failed++;
  }
  return { ready, failed, ms: Math.round(performance.now() - started), streams: streams.length };
}

function closeStreams() {
  for (const stream of streams) {
    stream.closed = true;
    stream.abort.abort();
  }
  const closed = streams.length;
  streams = [];
  for (const pool of receiverPools) pool.close();
  receiverPools = [];
  hubClients.clear();
  clearInterval(hubPinger);
  hubPinger = undefined;
  return { closed };
}

function resetReceivers() {
  phases.clear();
  receivedByChat.clear();
  totals.messages = totals.dups = totals.silentGaps = totals.gapsAfterReopen = totals.noBody = totals.heartbeats = totals.reopened = 0;
  totals.outOfOrder = totals.maxReorderDistance = 0;
  totals.otherEvents = {};
  totals.streamErrors = {};
  return {};
}

function stats(args: { phases?: string[]; byChat?: boolean; perMessage?: boolean }) {
  const out: Record<string, { received: number; dups: number; outOfOrder: number; hist: HistogramData; first: number; last: number; perMessage?: string }> = {};
  totals.silentGaps = 0;
  totals.gapsAfterReopen = 0;
  for (const stream of streams) {
    let missing = 0;
    for (const seen of stream.seen.values()) missing += seen.missing.size;
    if (stream.failures > 0) totals.gapsAfterReopen += missing;
    else totals.silentGaps += missing;
  }
  for (const [name, s] of phases) {
    if (args.phases && !args.phases.includes(name)) continue;
    out[name] = {
      received: s.received, dups: s.dups, outOfOrder: s.outOfOrder, hist: s.hist.toJSON(), first: s.first, last: s.last,
      perMessage: args.perMessage ? Buffer.from(s.perMessage.buffer, s.perMessage.byteOffset, s.perMessage.byteLength).toString("base64") : undefined,
    };
  }
  return {
    phases: out,
    totals,
    openStreams: streams.filter((s) => !s.closed).length,
    byChat: args.byChat ? Object.fromEntries(receivedByChat) : undefined,
  };
}

/** Cheap progress probe: received counts only. */
function counts(args: { phases: string[] }) {
  const out: Record<string, number> = {};
  for (const name of args.phases) out[name] = phases.get(name)?.received ?? 0;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Senders

let senderPool: { baseUrl: string; pool: Pool; raw: RawGrpc } | undefined;
/** Connect clients for set-up calls, and the lean client for the measured sends. */
function senders(baseUrl: string, connections: number): { pool: Pool; raw: RawGrpc } {
  if (senderPool && senderPool.baseUrl === baseUrl && senderPool.pool.managers.length === connections) return senderPool;
  senderPool?.pool.close();
  senderPool?.raw.close();
  senderPool = { baseUrl, pool: new Pool(baseUrl, connections), raw: new RawGrpc(baseUrl, connections) };
  return senderPool;
}
const sendPath = "/parley.v1.MessageService/SendMessage";

/** Accepted messages kept for the SQL check, by key (one key per scenario). */
const kept = new Map<string, { ids: string[]; chats: string[]; texts: string[] }>();

interface SendArgs {
  baseUrl: string;
  tenant: string;
  chats: { id: string; members: string[] }[];
  phase: string;
  mode: "rate" | "closed";
  rate: number;
  concurrency: number;
  durationMs: number;
  maxInFlight: number;
  textBytes: number;
  connections: number;
  timeoutMs: number;
  keepKey: string;
  /** "hub": each message goes over its sender's hub connection held by this worker (hubSubscribe). */
  via?: "grpc" | "hub";
  /** Not over the hub: SendMessage over gRPC (default) or the Connect protocol (binary). */
  protocol?: "grpc" | "connect";
  /** Message numbers are counter × stride + offset, so several sending workers never share one. */
  numbering?: { stride: number; offset: number };
}

async function send(args: SendArgs) {
  const via = args.via ?? "grpc";
  const raw = via === "grpc" ? senders(args.baseUrl, args.connections).raw : undefined;
  if (raw) for (const chat of args.chats) for (const member of chat.members) await bearer(args.tenant, member);
  const unary = raw && (args.protocol === "connect" ? raw.connectUnary.bind(raw) : raw.unary.bind(raw));
  const { stride, offset } = args.numbering ?? { stride: 1, offset: 0 };
  // Over the hub a member can only send from a connection this worker holds.
  const sendable = args.chats
    .map((chat, index) => ({ chat, index, from: via === "hub" ? chat.members.filter((m) => hubClients.has(m)) : chat.members }))
    .filter((c) => c.from.length > 0);
  if (sendable.length === 0) throw new Error("no chat has a member this worker can send as");
  const keep = kept.get(args.keepKey) ?? { ids: [], chats: [], texts: [] };
  kept.set(args.keepKey, keep);
  const hist = new Histogram();
  const errors: Record<string, number> = {};
  const acceptedPerChat: Record<string, number> = {};
  const perSecond: number[] = [];
  /** Chat index + 1 of each accepted message number, 0 when not accepted. */
  let accepted16 = new Uint16Array(4096);
  let attempted = 0;
  let accepted = 0;
  let shed = 0;
  let inFlight = 0;
  let counter = 0;
  let numbersUsed = 0;
  const padding = "x".repeat(Math.max(0, args.textBytes - 40));
  const started = clock();
  const end = started + args.durationMs;
  const inFlightDone = new Set<Promise<void>>();

  const sendOne = async (): Promise<void> => {
    const k = counter++;
    const i = k * stride + offset;
    numbersUsed = i + 1;
    const { chat, index, from } = sendable[k % sendable.length]!;
    const sender = from[Math.floor(k / sendable.length) % from.length]!;
    attempted++;
    inFlight++;
    const t0 = clock();
    const text = `${args.phase}|${t0.toFixed(3)}|${i}|${padding}`;
    try {
      const messageId = unary
        ? sentMessageId(await unary(sendPath, sendMessageRequest(chat.id, text), tokens.get(`${args.tenant}\u0000${sender}`)!, args.timeoutMs))
        : await hubSendMessage(sender, chat.id, text, args.timeoutMs);
      const t1 = clock();
      hist.record(t1 - t0);
      accepted++;
      acceptedPerChat[chat.id] = (acceptedPerChat[chat.id] ?? 0) + 1;
      if (i >= accepted16.length) {
        const grown = new Uint16Array(Math.max(i + 1, accepted16.length * 2));
        grown.set(accepted16);
        accepted16 = grown;
      }
      accepted16[i] = index + 1;
      const second = Math.floor((t1 - started) / 1000);
      perSecond[second] = (perSecond[second] ?? 0) + 1;
      keep.ids.push(messageId);
      keep.chats.push(chat.id);
      keep.texts.push(text);
    } catch (error) {
      const code = codeOf(error);
      errors[code] = (errors[code] ?? 0) + 1;
    } finally {
      inFlight--;
    }
  };

  if (args.mode === "rate") {
    let issued = 0;
    while (clock() < end) {
      const due = Math.floor(((clock() - started) / 1000) * args.rate);
      while (issued < due) {
        issued++;
        if (inFlight >= args.maxInFlight) {
          shed++;
          continue;
        }
        const p = sendOne();
        inFlightDone.add(p);
        void p.finally(() => inFlightDone.delete(p));
      }
      await sleep(1);
    }
  } else {
    await Promise.all(
      Array.from({ length: args.concurrency }, async () => {
        while (clock() < end) await sendOne();
      }),
    );
  }
  const sendEnd = clock();
  await Promise.race([Promise.allSettled([...inFlightDone]), sleep(args.timeoutMs + 2000)]);
  const elapsedMs = sendEnd - started;
  return {
    attempted, accepted, shed, errors, acceptedPerChat,
    stillInFlight: inFlight,
    elapsedMs: Math.round(elapsedMs),
    acceptedPerSecond: accepted / (elapsedMs / 1000),
    perSecond: Array.from(perSecond, (v) => v ?? 0),
    acceptedChats: Buffer.from(accepted16.buffer, 0, Math.min(accepted16.length, numbersUsed) * 2).toString("base64"),
    sendLatency: hist.toJSON(),
    started, sendEnd,
  };
}

async function createChats(args: { baseUrl: string; tenant: string; groups: string[][]; concurrency: number; name: string }) {
  const { pool } = senders(args.baseUrl, Math.max(1, senderPool?.pool.managers.length ?? 2));
  const ids: string[] = new Array(args.groups.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: args.concurrency }, async () => {
      for (;;) {
        const i = next++;
        if (i >= args.groups.length) return;
        const [creator, ...others] = args.groups[i]!;
        const authorization = await bearer(args.tenant, creator!);
        const res = await pool.chats[i % pool.chats.length]!.createChat(
          { name: `${args.name} ${i}`, memberIds: others },
          { headers: { authorization }, timeoutMs: 30_000 },
        );
        ids[i] = res.chat!.id;
      }
    }),
  );
  return { ids };
}

/** Every accepted message must be in PostgreSQL with its chat and text; sequences must be 1..N. */
async function verify(args: { databaseUrl: string; tenant: string; keepKey: string }) {
  const keep = kept.get(args.keepKey) ?? { ids: [], chats: [], texts: [] };
  const sql = postgres(args.databaseUrl, { max: 2, onnotice: () => {}, connect_timeout: 10 });
  try {
    let found = 0;
    let mismatched = 0;
    const missing: string[] = [];
    for (let i = 0; i < keep.ids.length; i += 5000) {
      const ids = keep.ids.slice(i, i + 5000);
      const rows = await sql`
        SELECT id::text AS id, chat_id::text AS chat_id, text FROM messages
        WHERE tenant_id = ${args.tenant} AND id = ANY(${ids}::uuid[])`;
      const byId = new Map(rows.map((r) => [r.id as string, r]));
      for (let j = 0; j < ids.length; j++) {
        const row = byId.get(ids[j]!);
        if (!row) {
          if (missing.length < 5) missing.push(ids[j]!);
          continue;
        }
        found++;
        if (row.chat_id !== keep.chats[i + j] || row.text !== keep.texts[i + j]) mismatched++;
      }
    }
    const [{ rows: tenantRows }] = (await sql`SELECT count(*)::int AS rows FROM messages WHERE tenant_id = ${args.tenant}`) as unknown as [{ rows: number }];
    const chats = await sql`
      SELECT c.id::text AS id, c.last_sequence::int AS last, count(m.sequence)::int AS n,
             coalesce(max(m.sequence), 0)::int AS max, count(DISTINCT m.sequence)::int AS distinct_n
      FROM chats c LEFT JOIN messages m ON m.tenant_id = c.tenant_id AND m.chat_id = c.id
      WHERE c.tenant_id = ${args.tenant} GROUP BY c.id, c.last_sequence`;
    let sequenceProblems = 0;
    const lastSequences: Record<string, number> = {};
    for (const c of chats) {
      lastSequences[c.id as string] = c.last as number;
      if (c.n !== c.last || c.max !== c.last || c.distinct_n !== c.n) sequenceProblems++;
    }
    return { accepted: keep.ids.length, found, mismatched, missing, tenantRows, chats: chats.length, sequenceProblems, lastSequences };
  } finally {
    await sql.end({ timeout: 5 });
  }
}

// ---------------------------------------------------------------------------------------------
// History

const listPath = "/parley.v1.MessageService/ListMessages";

/**
 * ListMessages (newest page) in several chats, the queries interleaved (chat 1, chat 2, chat 1, …) so
 * that every chat's figures meet the same GC pauses, background work and machine speed.
 */
async function history(args: { baseUrl: string; databaseUrl: string; tenant: string; user: string; chats: { chatId: string; lastSequence: number }[]; queries: number; warmup: number; pageSize: number }) {
  const client = new RawGrpc(args.baseUrl, 1);
  const sql = postgres(args.databaseUrl, { max: 1, onnotice: () => {}, connect_timeout: 10, types: { bigint: postgres.BigInt } });
  try {
    const authorization = await bearer(args.tenant, args.user);
    const out = args.chats.map((chat) => ({ ...chat, request: newestMessagesRequest(chat.chatId, args.pageSize), api: new Histogram(), raw: new Histogram(), wrongPages: 0 }));
    type Chat = (typeof out)[number];
    /** Runs `query` warm-up + queries times per chat, the chats taking turns, and records the timed ones. */
    const inTurns = async (query: (chat: Chat) => Promise<unknown>, histogram: (chat: Chat) => Histogram) => {
      for (let i = 0; i < args.warmup + args.queries; i++) {
        for (const chat of out) {
          const t0 = performance.now();
          await query(chat);
          if (i >= args.warmup) histogram(chat).record(performance.now() - t0);
        }
      }
    };
    await inTurns(async (chat) => {
      const page = readMessagePage(await client.unary(listPath, chat.request, authorization, 10_000));
      if (page.count !== args.pageSize || page.firstSequence !== chat.lastSequence) chat.wrongPages++;
    }, (chat) => chat.api);
    // The statement Parley runs (the page, with the membership check inside), straight from postgres.js.
    await inTurns((chat) => sql`SELECT * FROM messages WHERE tenant_id = ${args.tenant} AND chat_id = ${chat.chatId}
      AND EXISTS (SELECT 1 FROM members m WHERE m.tenant_id = ${args.tenant} AND m.chat_id = ${chat.chatId} AND m.user_id = ${args.user})
      ORDER BY sequence DESC LIMIT ${args.pageSize + 1}`, (chat) => chat.raw);
    const results = [];
    for (const chat of out) {
      const plan = await sql.unsafe(
        `EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) SELECT * FROM messages WHERE tenant_id = $1 AND chat_id = $2 ORDER BY sequence DESC LIMIT $3`,
        [args.tenant, chat.chatId, args.pageSize + 1],
      );
      results.push({ api: chat.api.toJSON(), raw: chat.raw.toJSON(), wrongPages: chat.wrongPages, plan: plan.map((r) => r["QUERY PLAN"] as string) });
    }
    return results;
  } finally {
    client.close();
    await sql.end({ timeout: 5 });
  }
}

// ---------------------------------------------------------------------------------------------
// Raw ceilings

async function pgInsert(args: { databaseUrl: string; durationMs: number; concurrency: number; pool: number }) {
  const sql = postgres(args.databaseUrl, { max: args.pool, onnotice: () => {}, connect_timeout: 10 });
  try {
    await sql`CREATE TABLE IF NOT EXISTS bench_raw_insert (
      id bigserial PRIMARY KEY, chat_id uuid NOT NULL, seq bigint NOT NULL, text text NOT NULL,
      create_time timestamptz NOT NULL DEFAULT clock_timestamp())`;
    const chat = crypto.randomUUID();
    const text = "x".repeat(100);
    const hist = new Histogram();
    let n = 0;
    let errors = 0;
    const started = performance.now();
    const end = started + args.durationMs;
    await Promise.all(
      Array.from({ length: args.concurrency }, async () => {
        while (performance.now() < end) {
          const t0 = performance.now();
          try {
            await sql`INSERT INTO bench_raw_insert (chat_id, seq, text) VALUES (${chat}, ${n}, ${text})`;
            hist.record(performance.now() - t0);
            n++;
          } catch {
            errors++;
          }
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    return { inserts: n, errors, perSecond: n / seconds, latency: hist.toJSON() };
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/**
 * Parley's own storage call for SendMessage (MessageStore.send from the code under test, so it never
 * goes stale), with the server's pool size, straight from postgres.js: no HTTP/2, gRPC, auth or NATS.
 */
async function pgStoreSend(args: { databaseUrl: string; serverRoot: string; durationMs: number; concurrency: number; pool: number; chats: number }) {
  const sql = postgres(args.databaseUrl, { max: args.pool, onnotice: () => {}, connect_timeout: 10, types: { bigint: postgres.BigInt } });
  const tenant = `raw-${crypto.randomBytes(4).toString("hex")}`;
  try {
    const { MessageStore } = (await import(pathToFileURL(path.join(args.serverRoot, "src/store/message-store.ts")).href)) as {
      MessageStore: new (db: { sql: postgres.Sql; cancellable: (query: postgres.PendingQuery<postgres.Row[]>) => unknown }) => { send(tenant: string, chatId: string, id: string, sender: string, text: string, clientMessageId: string): Promise<unknown> };
    };
    const store = new MessageStore({ sql, cancellable: (query) => query });
    const chatIds = Array.from({ length: args.chats }, () => uuidv7());
    await sql`INSERT INTO chats (tenant_id, id, name, creator_id, create_time, member_count, activity_time)
              SELECT ${tenant}, id, 'raw', 'u', now(), 1, now() FROM unnest(${chatIds}::uuid[]) AS id`;
    await sql`INSERT INTO members (tenant_id, chat_id, user_id, join_time, added_by)
              SELECT ${tenant}, id, 'u', now(), 'u' FROM unnest(${chatIds}::uuid[]) AS id`;
    const hist = new Histogram();
    let n = 0;
    let errors = 0;
    let firstError: string | undefined;
    let counter = 0;
    const text = "x".repeat(100);
    const started = performance.now();
    const end = started + args.durationMs;
    await Promise.all(
      Array.from({ length: args.concurrency }, async () => {
        while (performance.now() < end) {
          const chatId = chatIds[counter++ % chatIds.length]!;
          const t0 = performance.now();
          try {
            await store.send(tenant, chatId, uuidv7(), "u", text, "");
            hist.record(performance.now() - t0);
            n++;
          } catch (error) {
            errors++;
            firstError ??= String(error);
          }
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    return { sends: n, errors, firstError, perSecond: n / seconds, latency: hist.toJSON() };
  } finally {
    await sql`DELETE FROM chats WHERE tenant_id = ${tenant}`.catch(() => {});
    await sql.end({ timeout: 5 });
  }
}

async function natsBench(args: { natsUrl: string; durationMs: number; payloadBytes: number; latencyRate: number; latencyMs: number }) {
  const pub = await natsConnect({ servers: args.natsUrl, name: "bench-pub", timeout: 5000 });
  const sub = await natsConnect({ servers: args.natsUrl, name: "bench-sub", timeout: 5000 });
  try {
    const subject = `bench.raw.${crypto.randomBytes(4).toString("hex")}`;
    // Throughput: publish in batches of 1,000 with a flush (one round trip) per batch.
    let received = 0;
    let lastReceive = 0;
    const s1 = sub.subscribe(`${subject}.tp`, { callback: () => { received++; lastReceive = performance.now(); } });
    await sub.flush();
    const payload = new Uint8Array(args.payloadBytes);
    let published = 0;
    const started = performance.now();
    const end = started + args.durationMs;
    while (performance.now() < end) {
      for (let i = 0; i < 1000; i++) pub.publish(`${subject}.tp`, payload);
      published += 1000;
      await pub.flush();
    }
    const publishEnd = performance.now();
    const waitUntil = performance.now() + 5000;
    while (received < published && performance.now() < waitUntil) await sleep(20);
    s1.unsubscribe();
    const throughput = received / ((Math.max(lastReceive, publishEnd) - started) / 1000);

    // Latency at a fixed rate: the publish time travels in the payload.
    const hist = new Histogram();
    let latencyReceived = 0;
    const s2 = sub.subscribe(`${subject}.lat`, {
      callback: (_e, m) => {
        const view = new DataView(m.data.buffer, m.data.byteOffset, m.data.byteLength);
        hist.record(clock() - view.getFloat64(0));
        latencyReceived++;
      },
    });
    await sub.flush();
    const buffer = new Uint8Array(args.payloadBytes);
    const view = new DataView(buffer.buffer);
    let sent = 0;
    const t0 = performance.now();
    while (performance.now() - t0 < args.latencyMs) {
      const due = Math.floor(((performance.now() - t0) / 1000) * args.latencyRate);
      while (sent < due) {
        view.setFloat64(0, clock());
        pub.publish(`${subject}.lat`, buffer);
        sent++;
      }
      await sleep(1);
    }
    await pub.flush();
    const latencyWait = performance.now() + 3000;
    while (latencyReceived < sent && performance.now() < latencyWait) await sleep(20);
    s2.unsubscribe();
    return { published, received, perSecond: throughput, latencyRate: args.latencyRate, latencySent: sent, latencyReceived, latency: hist.toJSON() };
  } finally {
    await pub.close();
    await sub.close();
  }
}

let sockets: WebSocket[] = [];
async function wsConnect(args: { url: string; n: number; timeoutMs: number }) {
  let open = 0;
  await Promise.all(
    Array.from({ length: args.n }, () =>
      new Promise<void>((resolve) => {
        const ws = new WebSocket(args.url, { perMessageDeflate: false });
        sockets.push(ws);
        const timer = setTimeout(resolve, args.timeoutMs);
        ws.on("open", () => {
          open++;
          clearTimeout(timer);
          resolve();
        });
        ws.on("error", () => resolve());
        ws.on("message", (data: Buffer) => {
          const now = clock();
          const text = data.toString("latin1", 0, 64);
          const a = text.indexOf("|");
          const b = text.indexOf("|", a + 1);
          const stats = phaseStats(text.slice(0, a));
          stats.received++;
          stats.hist.record(now - Number(text.slice(a + 1, b)));
          if (stats.first === 0) stats.first = now;
          stats.last = now;
        });
      }),
    ),
  );
  return { open };
}

function wsClose() {
  for (const ws of sockets) ws.terminate();
  const closed = sockets.length;
  sockets = [];
  return { closed };
}

// ---------------------------------------------------------------------------------------------
// Hub connections (SignalR JSON protocol over WebSocket, without negotiate)

const recordSeparator = "\x1e";
let hubPinger: NodeJS.Timeout | undefined;

/**
 * Opens one hub connection: upgrade with the bearer header, handshake, then waits for the Ready event;
 * `onFrame` gets every frame after the one that carried Ready (installed in the same tick, so none is missed).
 */
function openHub(baseUrl: string, authorization: string, timeoutMs: number, onFrame?: (data: Buffer) => void): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${baseUrl.replace(/^http/, "ws")}/hubs/chat`, { headers: { authorization }, perMessageDeflate: false });
    const timer = setTimeout(() => fail(new Error("hub connection not ready in time")), timeoutMs);
    const fail = (error: Error) => {
      clearTimeout(timer);
      ws.terminate();
      reject(error);
    };
    ws.once("open", () => ws.send(JSON.stringify({ protocol: "json", version: 1 }) + recordSeparator));
    ws.once("error", fail);
    ws.once("close", (code) => fail(new Error(`hub closed with ${code} before Ready`)));
    const onMessage = (data: Buffer) => {
      if (!data.toString("utf8").includes('"target":"Ready"')) return;
      clearTimeout(timer);
      ws.off("message", onMessage);
      ws.removeAllListeners("close");
      ws.removeAllListeners("error");
      ws.on("error", () => {});
      if (onFrame) ws.on("message", onFrame);
      resolve(ws);
    };
    ws.on("message", onMessage);
  });
}

/** The hub closes clients silent for PARLEY_HUB_TIMEOUT_SECONDS (30 s by default): a SignalR ping keeps them open. */
function startHubPings(): void {
  hubPinger ??= setInterval(() => {
    const ping = JSON.stringify({ type: 6 }) + recordSeparator;
    for (const { ws } of hubClients.values()) if (ws.readyState === WebSocket.OPEN) ws.send(ping);
  }, 10_000);
}

// Each user's one hub connection receives its events (counted like a Subscribe stream's) and carries
// that user's SendMessage invocations.

interface HubClient {
  ws: WebSocket;
  stream: Stream;
  pending: Map<string, { resolve: (result: { id: string }) => void; reject: (error: Error) => void; timer: NodeJS.Timeout }>;
  nextInvocation: number;
}
const hubClients = new Map<string, HubClient>();

class HubError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

const hubEventKinds: Record<string, NotificationSummary["kind"]> = {
  MessageCreated: "messageCreated", ChatCreated: "chatCreated", MemberAdded: "memberAdded", MemberRemoved: "memberRemoved", ReadUpdated: "readUpdated",
};

function onHubFrame(client: HubClient, data: Buffer): void {
  for (const record of data.toString("utf8").split(recordSeparator)) {
    if (!record) continue;
    const m = JSON.parse(record) as { type: number; target?: string; arguments?: any[]; invocationId?: string; result?: { id: string }; error?: string };
    if (m.type === 1) {
      const event = m.arguments?.[0];
      const kind = hubEventKinds[m.target ?? ""] ?? "none";
      onNotification(client.stream, kind === "messageCreated"
        ? { kind, chatId: event.chatId, sequence: Number(event.sequence), text: event.message?.text }
        : { kind, chatId: "", sequence: 0 });
    } else if (m.type === 3) {
      const call = client.pending.get(m.invocationId ?? "");
      if (!call) continue;
      client.pending.delete(m.invocationId!);
      clearTimeout(call.timer);
      if (m.error !== undefined) call.reject(new HubError(m.error.split(":")[0] ?? "error", m.error));
      else call.resolve(m.result!);
    }
  }
}

function openHubClient(baseUrl: string, tenant: string, user: string, timeoutMs: number): Stream {
  const { stream, markReady } = newStream(tenant, user);
  void (async () => {
    // The client exists before its socket: frames that arrive with Ready are handed to it at once.
    const client: HubClient = { ws: undefined as unknown as WebSocket, stream, pending: new Map(), nextInvocation: 1 };
    try {
      client.ws = await openHub(baseUrl, await bearer(tenant, user), timeoutMs, (data) => onHubFrame(client, data));
    } catch (error) {
      stream.failures++;
      countStreamError((error as Error).message);
      markReady(false);
      return;
    }
    hubClients.set(user, client);
    stream.abort.signal.addEventListener("abort", () => client.ws.terminate());
    client.ws.on("close", (code) => {
      for (const call of client.pending.values()) {
        clearTimeout(call.timer);
        call.reject(new HubError("closed", `hub connection closed (${code})`));
      }
      client.pending.clear();
      if (hubClients.get(user) === client) hubClients.delete(user);
      if (stream.closed) return;
      stream.failures++;
      countStreamError(`hub closed ${code}`);
    });
    markReady(true);
  })();
  return stream;
}

/**
 * Like subscribe, over the hub: one WebSocket per user (the hub always includes message bodies and
 * has no shared connections; a closed connection is counted, not reopened).
 */
async function hubSubscribe(args: SubscribeArgs) {
  const opened = await openAll(args, (user) => openHubClient(args.baseUrl, args.tenant, user, args.readyTimeoutMs));
  startHubPings();
  return opened;
}

/** SendMessage(chatId, text) on the sender's own hub connection; resolves with the stored message's id. */
function hubSendMessage(user: string, chatId: string, text: string, timeoutMs: number): Promise<string> {
  const client = hubClients.get(user);
  if (!client) return Promise.reject(new HubError("no connection", `no hub connection for ${user}`));
  const invocationId = String(client.nextInvocation++);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.pending.delete(invocationId);
      reject(new HubError("deadline_exceeded", "no completion in time"));
    }, timeoutMs);
    client.pending.set(invocationId, { resolve: (message) => resolve(message.id), reject, timer });
    client.ws.send(JSON.stringify({ type: 1, invocationId, target: "SendMessage", arguments: [chatId, text] }) + recordSeparator);
  });
}

// ---------------------------------------------------------------------------------------------

const commands: Record<string, (args: any) => unknown> = {
  subscribe, hubSubscribe, closeStreams, resetReceivers, stats, counts, send, createChats, verify, history,
  pgInsert, pgStoreSend, natsBench, wsConnect, wsClose,
  delivered: () => {
    let n = 0;
    for (const v of receivedByChat.values()) n += v;
    return n;
  },
  forget: (args: { keepKey: string }) => ({ forgotten: kept.delete(args.keepKey) }),
  closeSenders: () => {
    senderPool?.pool.close();
    senderPool?.raw.close();
    senderPool = undefined;
    return {};
  },
  memory: () => process.memoryUsage(),
  /** Event-loop delay since the last call, in ms. */
  loopDelay: () => {
    const delay = { p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 };
    loopDelay.reset();
    return delay;
  },
};

process.on("message", (message: { id: number; cmd: string; args: unknown }) => {
  const command = commands[message.cmd];
  void (async () => {
    try {
      if (!command) throw new Error(`unknown command ${message.cmd}`);
      const result = await command(message.args);
      process.send?.({ id: message.id, ok: true, result });
    } catch (error) {
      process.send?.({ id: message.id, ok: false, error: (error as Error)?.stack ?? String(error) });
    }
  })();
});
// Never outlive the parent. A clean exit also on SIGTERM, so that --cpu-prof (BENCH_WORKER_NODE_ARGS) writes its profile.
process.on("disconnect", () => process.exit(0));
process.on("SIGTERM", () => process.exit(0));
process.on("unhandledRejection", (error) => {
  console.error(`${workerName}: unhandled rejection`, error);
});
