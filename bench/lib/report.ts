import type { ServerReport } from "./context.js";
import type { LatencySummary } from "./hist.js";
import type { WindowUsage } from "./proc-stats.js";
import type { Fanout1Scenario, FanoutScenario, HistoryMeasure, IdleMeasure, IdleScenario, IdleStreams, PhaseResult, RawCeilings } from "./scenarios.js";

export interface Results {
  startedAt: string;
  rawFile?: string;
  finishedAt?: string;
  durationSeconds?: number;
  quick: boolean;
  environment: Record<string, unknown>;
  plan: unknown;
  clientNote: string;
  raw?: RawCeilings;
  chats10?: FanoutScenario;
  chats100?: FanoutScenario;
  /** The same shapes as chats10 / chats100 with every client on one SignalR hub WebSocket (receiving and sending). */
  chats10Hub?: FanoutScenario;
  chats100Hub?: FanoutScenario;
  fanout1?: Fanout1Scenario;
  idle?: IdleScenario;
  history?: HistoryMeasure[];
  servers: Record<string, ServerReport>;
  /** Machine busy % (of cores × 100) just before each scenario, while the benchmark itself was idle. */
  machineBefore: Record<string, { busyPercent: number; waitedMs: number }>;
  profiles: Record<string, unknown>;
  errors: Record<string, string>;
  targets?: Target[];
}

export interface Target {
  target: string;
  measured: string;
  met: boolean | null;
}

const P99_TARGET_MS = 50;

/** Sustained: everything offered was accepted (≥ 99%, nothing shed, no errors), p99 within target, nothing lost. */
export function sustained(p: PhaseResult): boolean {
  return p.offeredRate !== null && p.acceptedPerSecond >= 0.99 * p.offeredRate && p.shed === 0 &&
    Object.keys(p.sendErrors).length === 0 && (p.latency.p99 ?? Infinity) <= P99_TARGET_MS && p.lost === 0;
}

function chats10Targets(s: FanoutScenario | undefined, over: string): Target[] {
  const a = s?.phases.find((p) => p.offeredRate === 2500);
  const best = bestSustained(s);
  return [{
    target: `Chats of 10${over}: ≥ 2,500 msg/s sustained, p99 ≤ 50 ms, nothing lost`,
    measured: a ? `at 2,500/s offered: ${a.acceptedPerSecond} msg/s accepted, p99 ${fmt(a.latency.p99)} ms, lost ${a.lost}, shed ${a.shed}` : "not measured",
    met: a ? sustained(a) : null,
  }, {
    target: `Chats of 10${over}: highest offered rate sustained (same criteria)`,
    measured: best ? `${best.offeredRate} msg/s (p99 ${fmt(best.latency.p99)} ms)` : "none of the offered rates",
    met: best ? (best.offeredRate ?? 0) >= 2500 : s ? false : null,
  }];
}

function chats100Target(s: FanoutScenario | undefined, over: string): Target {
  const b = s?.phases.find((p) => p.offeredRate === 300);
  return {
    target: `Chats of 100${over}: 300 msg/s at p99 ≤ 50 ms`,
    measured: b ? `${b.acceptedPerSecond} msg/s accepted, p99 ${fmt(b.latency.p99)} ms, lost ${b.lost}` : "not measured",
    met: b ? b.acceptedPerSecond >= 0.99 * 300 && b.shed === 0 && (b.latency.p99 ?? Infinity) <= P99_TARGET_MS : null,
  };
}

export function judge(results: Results): Target[] {
  const targets: Target[] = [];
  targets.push(...chats10Targets(results.chats10, ""));
  targets.push(chats100Target(results.chats100, ""));
  if (results.chats10Hub) targets.push(...chats10Targets(results.chats10Hub, " over the SignalR hub"));
  if (results.chats100Hub) targets.push(chats100Target(results.chats100Hub, " over the SignalR hub"));
  const idleMax = results.idle?.multiplexed.at(-1);
  targets.push({
    target: "Idle Subscribe stream ≤ 20 KiB server memory (multiplexed, largest count)",
    measured: idleMax ? `${idleMax.perStreamKiB} KiB RSS per stream at ${idleMax.streams} streams (heap ${idleMax.perStreamHeapKiB} KiB)${floorText(results.idle, (f) => f.multiplexed.at(-1))}` : "not measured",
    met: idleMax ? idleMax.perStreamKiB <= 20 && idleMax.failed === 0 : null,
  });
  const dedicated = results.idle?.dedicated;
  targets.push({
    target: "Idle connection ≤ 20 KiB (one HTTP/2 connection per stream)",
    measured: dedicated ? `${dedicated.perStreamKiB} KiB RSS per connection at ${dedicated.streams} connections (heap ${dedicated.perStreamHeapKiB} KiB)${floorText(results.idle, (f) => f.dedicated)}` : "not measured",
    met: dedicated ? dedicated.perStreamKiB <= 20 && dedicated.failed === 0 : null,
  });
  const hubMax = results.idle?.hub?.at(-1);
  targets.push({
    target: "Idle connection ≤ 20 KiB (SignalR hub WebSocket, largest count)",
    measured: hubMax ? `${hubMax.perStreamKiB} KiB RSS per connection at ${hubMax.streams} connections (heap ${hubMax.perStreamHeapKiB} KiB)` : "not measured",
    met: hubMax ? hubMax.perStreamKiB <= 20 && hubMax.failed === 0 : null,
  });
  const h10k = results.history?.find((h) => h.messages === 10_000);
  const hBig = results.history?.filter((h) => h.messages > 10_000).at(-1);
  targets.push({
    target: "History: ListMessages last 50, p99 ≤ 10 ms in a chat of 10,000",
    measured: h10k ? `p99 ${fmt(h10k.api.p99)} ms (p50 ${fmt(h10k.api.p50)} ms)` : "not measured",
    met: h10k ? (h10k.api.p99 ?? Infinity) <= 10 : null,
  });
  targets.push({
    target: `History: p99 in a chat of ${hBig ? hBig.messages.toLocaleString("en-US") : "1,000,000"} ≤ 1.5 × p99 at 10,000`,
    measured: hBig && h10k ? `p99 ${fmt(hBig.api.p99)} ms = ${fmt((hBig.api.p99 ?? 0) / Math.max(0.001, h10k.api.p99 ?? 0), 2)} × (also ≤ 15 ms: ${(hBig.api.p99 ?? Infinity) <= 15 ? "yes" : "no"})` : "not measured",
    met: hBig && h10k ? (hBig.api.p99 ?? Infinity) <= 1.5 * (h10k.api.p99 ?? 0) : null,
  });
  return targets;
}

function bestSustained(s: FanoutScenario | undefined): PhaseResult | undefined {
  return s?.phases.filter(sustained).sort((x, y) => (y.offeredRate ?? 0) - (x.offeredRate ?? 0))[0];
}

function fmt(value: number | null | undefined, digits = 1): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function lat(l: LatencySummary): string {
  return `${fmt(l.p50, 2)} / ${fmt(l.p99, 2)} / ${fmt(l.p999, 2)}`;
}

function cpu(u: WindowUsage | undefined, group: string): string {
  return fmt(u?.groups[group]?.cpuPercent);
}

/** Server CPU: all threads (main thread). */
function serverCpu(u: WindowUsage | undefined): string {
  const main = u?.serverThreads?.["main thread"];
  return `${fmt(u?.groups.server?.cpuPercent)}${main === undefined ? "" : ` (${fmt(main)})`}`;
}

const CORE_SLOWNESS = "core slowness: CPU time of a fixed workload ÷ at the run's start, median / slowest sample";

/** The fixed-work probe against the run's start: median / slowest sample (1.00 = cores as fast as then). */
function coreSlowness(u: WindowUsage | undefined, atStart: number | undefined): string {
  const probe = u?.fixedWorkMicros;
  if (!probe || !atStart) return "–";
  return `${(probe.median / atStart).toFixed(2)} / ${(probe.max / atStart).toFixed(2)}`;
}

function errorsText(e: Record<string, number>): string {
  const entries = Object.entries(e);
  return entries.length ? entries.map(([k, v]) => `${k} ${v}`).join(", ") : "0";
}

function ratio(a: number | undefined, b: number | undefined): string {
  if (!a || !b) return "–";
  return `${fmt((a / b) * 100)}%`;
}

function phaseTable(s: FanoutScenario, raw: RawCeilings | undefined, probeAtStart: number | undefined): string[] {
  const lines = [
    `| offered | accepted msg/s | deliveries/s | ÷ ws ceiling | latency p50 / p99 / p99.9 ms | lost (messages not reaching every member) | late (after the phase's drain) | dup | out of order | send errors / shed | SendMessage p50 / p99 ms | Parley's send statements: count, mean sends each, duration p50 / p99 (bucket bounds) | drain ms | server CPU % (main thread) | server RSS max MiB | event-loop stalls p99 / max ms (beyond the monitor's 10 ms timer): server; worst client | clients CPU % | postgres CPU % | nats CPU % | machine CPU % (max 200) | other procs CPU % | ${CORE_SLOWNESS} | sustained? |`,
    "|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
  ];
  for (const p of s.phases) {
    lines.push(`| ${p.offered} | ${fmt(p.acceptedPerSecond)} | ${fmt(p.deliveriesPerSecond, 0)} | ${ratio(p.deliveriesPerSecond, raw?.ws?.deliveriesPerSecond)} | ${lat(p.latency)} | ${p.lost} (${p.incompleteMessages}) | ${p.lateDeliveries ?? "–"} | ${p.duplicates} | ${p.outOfOrder} | ${errorsText(p.sendErrors)} / ${p.shed} | ${fmt(p.sendLatency.p50, 2)} / ${fmt(p.sendLatency.p99, 2)} | ${statementsText(p)} | ${p.drainMs} | ${serverCpu(p.usage)} | ${fmt(p.usage?.groups.server?.rssMaxMiB)} | ${loopDelayText(p)} | ${cpu(p.usage, "clients")} | ${cpu(p.usage, "postgres")} | ${cpu(p.usage, "nats")} | ${fmt(p.usage?.machineCpuPercent)} | ${fmt(p.usage?.otherCpuPercent)} | ${coreSlowness(p.usage, probeAtStart)} | ${p.offeredRate === null ? "–" : sustained(p) ? "yes" : "no"} |`);
  }
  return lines;
}

/**
 * Node's event-loop delay monitor (the load workers' own, and prom-client's in Parley, both with a 10 ms
 * timer) records the whole interval between its timer's runs, so an idle loop reads 10 ms: the stall
 * is what exceeds that. The results keep the monitors' readings; tables show the stall.
 */
const LOOP_MONITOR_INTERVAL_MS = 10;

function statementsText(p: PhaseResult): string {
  const st = p.sendStatements;
  return st ? `${fmt(st.count, 0)}, ${fmt(st.meanSends)}, ${st.duration.p50} / ${st.duration.p99}` : "–";
}

function loopDelayText(p: PhaseResult): string {
  const d = p.loopDelay;
  const stall = (ms: number) => fmt(Math.max(0, ms - LOOP_MONITOR_INTERVAL_MS));
  return d ? `${stall(d.server.p99)} / ${stall(d.server.max)}; ${stall(d.clients.p99)} / ${stall(d.clients.max)}` : "–";
}

function drainNote(s: FanoutScenario): string {
  const d = s.finalDrain;
  return "Lost, late, duplicates, out of order and the latency percentiles are counted at the end of the scenario, after waiting for the last deliveries" +
    (d ? ` (${fmt(d.waitedMs / 1000)} s; ${d.complete ? "every member had every committed message" : "gave up before every delivery arrived"})` : "") +
    "; \"late\" = deliveries that came after the phase's own drain window (they still count in the latency). Deliveries/s is measured during the phase.";
}

function verificationLines(s: FanoutScenario | Fanout1Scenario): string[] {
  const v = s.verification;
  const r = s.receivers;
  if (!v) return ["Verification: not reached."];
  return [
    `Verification (SQL, after the run): ${v.found.toLocaleString("en-US")} of ${v.accepted.toLocaleString("en-US")} accepted messages found by id in PostgreSQL` +
      ` (${v.mismatched} with a different chat or text; missing ids: ${v.missing.length ? v.missing.join(", ") : "none"}); ` +
      `${v.tenantRows.toLocaleString("en-US")} message rows in the tenant (rows − accepted = ${v.tenantRows - v.accepted}: sends that committed although the client saw an error or timeout); ` +
      `${v.sequenceProblems} of ${v.chats} chats with gaps or duplicates in 1..last_sequence.`,
    `Deliveries over the whole scenario (members × last_sequence per chat, every member subscribed from the start): ${v.receivedDeliveries.toLocaleString("en-US")} of ${v.expectedDeliveries.toLocaleString("en-US")}, lost ${v.lostDeliveries.toLocaleString("en-US")}.` +
      (r ? ` Streams: ${r.openStreams} open at the end, closed by the server ${errorsText(r.streamErrors)} (re-opened ${r.reopened}); sequences never delivered on streams that never failed: ${r.silentGaps}, on re-opened streams: ${r.gapsAfterReopen}; delivered out of sequence order (late, not lost): ${r.outOfOrder} (largest distance ${r.maxReorderDistance}); duplicates ${r.dups}; MessageCreated without body ${r.noBody}.` : ""),
  ];
}

export function markdown(results: Results): string {
  const raw = results.raw;
  const out: string[] = [];
  out.push(`# Parley benchmark${results.quick ? " (BENCH_QUICK smoke run — short phases, not the real figures)" : ""}`, "");
  out.push(`Run ${results.startedAt} → ${results.finishedAt ?? "?"} (${fmt(results.durationSeconds, 0)} s). Raw data: \`${results.rawFile ?? "bench/results/"}\`.`, "");
  const env = results.environment;
  const probeAtStart = typeof env.fixedWorkMicrosAtStart === "number" ? env.fixedWorkMicrosAtStart : undefined;
  out.push(`Machine: ${env.cores} cores (${env.cpuModel}), ${env.memoryGiB} GiB; Node ${env.node}; ${env.postgres}; NATS ${env.nats}; checkout at ${env.commit}${env.dirty ? " (src/ with uncommitted changes)" : ""}; Parley ran from: ${env.server ?? "working tree"}. Load average before the run: ${env.loadBefore}.`, "");
  out.push(`Everything (Parley, PostgreSQL, NATS, load generators) shares these cores: the "machine CPU" column is out of ${Number(env.cores) * 100}%, "other procs" is CPU used by processes outside the benchmark during the phase.`, "");
  const before = Object.entries(results.machineBefore ?? {});
  if (before.length) out.push(`Machine busy just before each scenario (benchmark idle; other tenants of the box): ${before.map(([k, v]) => `(${k}) ${v.busyPercent}%`).join(", ")}.`, "");
  out.push(results.clientNote, "");

  out.push("## Targets", "", "| target | measured | met? |", "|---|---|---|");
  for (const t of results.targets ?? []) out.push(`| ${t.target} | ${t.measured} | ${t.met === null ? "not measured" : t.met ? "**met**" : "**missed**"} |`);
  out.push("");

  const fanouts: [string, FanoutScenario | undefined][] = [["a", results.chats10], ["b", results.chats100], ["g", results.chats10Hub], ["h", results.chats100Hub]];
  for (const [key, s] of fanouts) {
    if (!s) continue;
    const hub = s.via === "hub";
    out.push(`## (${key}) ${s.clients.toLocaleString("en-US")} clients in ${s.chats} chats of ${s.chatSize}${hub ? " over the SignalR hub" : ""}`, "");
    if (hub) {
      out.push("Every client holds one hub WebSocket (`/hubs/chat`, JSON protocol, no negotiate) and receives `MessageCreated` with the message body on it; " +
        "it also sends on it: the two receiver workers invoke `SendMessage(chatId, text)` as a member whose connection they hold, each at half the offered rate " +
        "(open loop, at most 500 in flight each) or half the closed-loop concurrency, and time the send to its completion.", "");
    }
    out.push(`Set-up: ${s.setup.ready} of ${s.clients} ${hub ? "hub connections" : "Subscribe streams"} ready (${s.setup.failed} failed) in ${s.setup.subscribeMs} ms. Each phase ${fmt(s.phases[0]?.seconds)} s. Latency = send start (time in the message text) → the member's ${hub ? "connection" : "stream"} delivered it, over all members.`, "");
    out.push(drainNote(s), "");
    out.push(...phaseTable(s, raw, probeAtStart), "", ...verificationLines(s), "");
  }
  if (results.fanout1) {
    const s = results.fanout1;
    out.push(`## (c) Send throughput at saturation, fan-out 1 (${s.chats} chats of 1 member, each subscribed)`, "");
    out.push(`| load | accepted msg/s | ÷ raw MessageStore.send ceiling | ÷ raw INSERT ceiling | SendMessage p50 / p99 / p99.9 ms | Parley's send statements: count, mean sends each, duration p50 / p99 | delivery p50 / p99 ms | lost | send errors | server CPU % (main thread) | postgres CPU % | machine CPU % | other procs CPU % | ${CORE_SLOWNESS} |`, "|---|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|---:|---|");
    for (const p of s.runs) {
      out.push(`| ${p.offered} | ${fmt(p.acceptedPerSecond)} | ${ratio(p.acceptedPerSecond, raw?.pgSendTx?.perSecond)} | ${ratio(p.acceptedPerSecond, raw?.pgInsert?.perSecond)} | ${lat(p.sendLatency)} | ${statementsText(p)} | ${fmt(p.latency.p50, 2)} / ${fmt(p.latency.p99, 2)} | ${p.lost} | ${errorsText(p.sendErrors)} | ${serverCpu(p.usage)} | ${cpu(p.usage, "postgres")} | ${fmt(p.usage?.machineCpuPercent)} | ${fmt(p.usage?.otherCpuPercent)} | ${coreSlowness(p.usage, probeAtStart)} |`);
    }
    out.push("", ...verificationLines(s), "");
  }
  if (results.idle) {
    const s = results.idle;
    out.push("## (d) Memory per idle Subscribe stream", "");
    out.push("Users are in chats of 10 (each stream listens to its user subject and one chat subject). Baseline after a warm-up (200 streams opened and closed); each measurement forces a full GC through the inspector, then takes the median RSS of 5 samples; V8 heap = live heap after that GC. Measured again 5 s after the streams are ready.", "");
    const streamRows = (streams: IdleStreams) => {
      out.push("| streams | HTTP/2 connections | ready / failed | server RSS base → with streams MiB | RSS per stream KiB | V8 heap per stream KiB | marginal RSS / heap per added stream KiB | server CPU % while idle |", "|---:|---:|---|---|---:|---:|---|---:|");
      for (const m of [...(streams.dedicated ? [streams.dedicated] : []), ...streams.multiplexed]) {
        out.push(`| ${m.streams.toLocaleString("en-US")} | ${m.connections.toLocaleString("en-US")} | ${m.ready} / ${m.failed} | ${idleCells(m)} |`);
      }
    };
    streamRows(s);
    if (s.floor) {
      out.push("", "Floor 1, Node's HTTP/2 alone: the same clients and streams held by `bench/idle-floor-server.ts` (`IDLE_FLOOR=http2`), Node's HTTP/2 server with Parley's listener and settings, through the compatibility API Connect uses, answering each Subscribe with headers and Ready and nothing else (no Connect, no services, no bus):", "");
      streamRows(s.floor);
    }
    if (s.connectFloor) {
      out.push("", "Floor 2, Connect alone (`IDLE_FLOOR=connect`): the same, with a Connect router holding only a Subscribe that yields Ready and waits, reached as Parley reaches its own (no interceptors, no services, no bus):", "");
      streamRows(s.connectFloor);
    }
    if (s.hub?.length) {
      out.push("", "SignalR hub connections (`/hubs/chat`, JSON protocol, one WebSocket each, no negotiate; clients ping every 10 s), measured the same way on a fresh server:", "");
      out.push("| hub connections | ready / failed | server RSS base → with connections MiB | RSS per connection KiB | V8 heap per connection KiB | marginal RSS / heap per added connection KiB | server CPU % while idle |", "|---:|---|---|---:|---:|---|---:|");
      for (const m of s.hub) out.push(`| ${m.streams.toLocaleString("en-US")} | ${m.ready} / ${m.failed} | ${idleCells(m)} |`);
    }
    if (s.heap && "rows" in s.heap) {
      out.push("", `Heap snapshots before and after opening ${s.heap.streams} streams (separate server): ${fmt(s.heap.totalBytesPerStream / 1024, 2)} KiB of live objects per stream, largest contributors:`, "");
      out.push("| bytes per stream | objects per stream | V8 type: constructor |", "|---:|---:|---|");
      for (const r of s.heap.rows.slice(0, 15)) out.push(`| ${r.bytesPerUnit} | ${r.countPerUnit} | ${r.what.replace(/\|/g, "\\|")} |`);
    } else if (s.heap && "error" in s.heap) {
      out.push("", `Heap snapshot diff failed: ${s.heap.error}`);
    }
    out.push("");
  }
  if (results.history) {
    out.push("## (e) History: ListMessages, newest 50", "");
    out.push(`${results.history[0]?.api.count ?? 0} sequential queries per chat after 20 warm-up queries, over one HTTP/2 connection, the chats taking turns (every chat is filled, vacuumed and checkpointed before the first query, so all sizes meet the same machine); "raw SQL" = the statement Parley runs (the page with its membership check) straight from postgres.js.`, "");
    out.push("| messages in chat | API p50 / p99 / p99.9 ms (client-measured) | server-side handler p50 / p99 (Parley's RPC histogram buckets, all chats' queries with the warm-up) | raw SQL p50 / p99 ms | API p99 ÷ raw p99 | wrong pages | bulk insert rows/s |", "|---:|---|---|---|---:|---:|---:|");
    for (const h of results.history) {
      out.push(`| ${h.messages.toLocaleString("en-US")} | ${lat(h.api)} | ${h.serverSide ? `${h.serverSide.p50} / ${h.serverSide.p99}` : "–"} | ${fmt(h.rawSql.p50, 2)} / ${fmt(h.rawSql.p99, 2)} | ${fmt((h.api.p99 ?? 0) / Math.max(0.001, h.rawSql.p99 ?? 0), 1)}× | ${h.wrongPages} | ${fmt(h.insertRowsPerSecond, 0)} |`);
    }
    const planLarge = results.history.at(-1)?.plan;
    if (planLarge) out.push("", "Plan of the page query in the largest chat:", "", "```", ...planLarge, "```");
    out.push("");
  }
  if (raw) {
    out.push("## (f) Raw ceilings on the same machine, same run", "");
    out.push("| ceiling | value | latency p50 / p99 ms | CPU during the test |", "|---|---:|---|---|");
    if (raw.pgInsert) out.push(`| PostgreSQL single-row INSERT (autocommit), postgres.js pool ${raw.pgInsert.pool}, ${raw.pgInsert.concurrency} concurrent (pipelined) | ${fmt(raw.pgInsert.perSecond, 0)} /s | ${fmt(raw.pgInsert.latency.p50, 2)} / ${fmt(raw.pgInsert.latency.p99, 2)} | postgres ${cpu(raw.pgInsert.usage, "postgres")}%, client ${cpu(raw.pgInsert.usage, "clients")}% |`);
    if (raw.pgSendTx) out.push(`| Parley's own \`MessageStore.send\` (the SQL behind SendMessage, from the code under test) straight from postgres.js, pool ${raw.pgSendTx.pool} (as the server), ${raw.pgSendTx.concurrency} concurrent, 1,000 chats${raw.pgSendTx.errors ? `, ${raw.pgSendTx.errors} errors (${raw.pgSendTx.firstError ?? ""})` : ""} | ${fmt(raw.pgSendTx.perSecond, 0)} /s | ${fmt(raw.pgSendTx.latency.p50, 2)} / ${fmt(raw.pgSendTx.latency.p99, 2)} | postgres ${cpu(raw.pgSendTx.usage, "postgres")}%, client ${cpu(raw.pgSendTx.usage, "clients")}% |`);
    if (raw.nats) out.push(`| NATS publish→subscribe (250 B, one process, two connections); latency at ${raw.nats.latencyRate}/s | ${fmt(raw.nats.perSecond, 0)} msgs/s | ${fmt(raw.nats.latency.p50, 3)} / ${fmt(raw.nats.latency.p99, 3)} | nats ${cpu(raw.nats.usage, "nats")}%, client ${cpu(raw.nats.usage, "clients")}% |`);
    if (raw.ws) out.push(`| Plain \`ws\` server broadcasting to ${raw.ws.clients} clients (250 B) | ${fmt(raw.ws.deliveriesPerSecond, 0)} deliveries/s (${fmt(raw.ws.messagesPerSecond, 0)} msgs/s) | ${fmt(raw.ws.latency.p50, 2)} / ${fmt(raw.ws.latency.p99, 2)} | ws server ${cpu(raw.ws.usage, "wsServer")}%, clients ${cpu(raw.ws.usage, "clients")}% |`);
    for (const e of raw.errors) out.push(`| error | ${e} | | |`);
    out.push("");
    const ratios: string[] = [];
    const sat10 = results.chats10?.phases.find((p) => p.offeredRate === null);
    const sat100 = results.chats100?.phases.find((p) => p.offeredRate === null);
    if (sat10 && raw.ws) ratios.push(`- Chats of 10 at saturation: ${fmt(sat10.deliveriesPerSecond, 0)} deliveries/s = ${ratio(sat10.deliveriesPerSecond, raw.ws.deliveriesPerSecond)} of the plain ws broadcast ceiling; ${fmt(sat10.acceptedPerSecond)} msg/s = ${ratio(sat10.acceptedPerSecond, raw.pgSendTx?.perSecond)} of the raw MessageStore.send ceiling and ${ratio(sat10.acceptedPerSecond, raw.nats?.perSecond)} of NATS msgs/s.`);
    if (sat100 && raw.ws) ratios.push(`- Chats of 100 at saturation: ${fmt(sat100.deliveriesPerSecond, 0)} deliveries/s = ${ratio(sat100.deliveriesPerSecond, raw.ws.deliveriesPerSecond)} of the ws ceiling.`);
    if (results.fanout1?.best && raw.pgSendTx) ratios.push(`- Fan-out 1 at saturation (best: ${results.fanout1.best.label}): ${fmt(results.fanout1.best.acceptedPerSecond)} msg/s = ${ratio(results.fanout1.best.acceptedPerSecond, raw.pgSendTx.perSecond)} of MessageStore.send run straight from postgres.js, ${ratio(results.fanout1.best.acceptedPerSecond, raw.pgInsert?.perSecond)} of single-row INSERTs.`);
    if (ratios.length) out.push("Ratios:", "", ...ratios, "");
  }

  const servers = Object.entries(results.servers);
  if (servers.length) {
    out.push("## Server health during the run", "", "| server run | exit | RPCs not ok (from /metrics) | bus publish failures | log lines at warn/error |", "|---|---|---|---:|---|");
    for (const [name, s] of servers) {
      const problems = Object.entries(s.problems).map(([k, v]) => `${v}× ${k.replace(/\|/g, "\\|")}`).join("; ") || "none";
      out.push(`| ${name} | code ${s.exit.code}${s.exit.signal ? `, signal ${s.exit.signal}` : ""} | ${errorsText(s.rpcErrors).replace(/\|/g, "\\|")} | ${s.publishFailures} | ${problems} |`);
    }
    out.push("");
  }
  const errors = Object.entries(results.errors);
  if (errors.length) {
    out.push("## Benchmark errors", "");
    for (const [k, v] of errors) out.push(`- ${k}: ${v.split("\n")[0]}`);
    out.push("");
  }
  return out.join("\n");
}

/** The cells of an idle measurement after its count columns. */
function idleCells(m: IdleMeasure): string {
  const marginal = m.marginalKiB === null ? "–" : `${fmt(m.marginalKiB, 2)} / ${fmt(m.marginalHeapKiB, 2)}`;
  return `${fmt(m.baseRssMiB)} → ${fmt(m.rssMiB)} | ${fmt(m.perStreamKiB, 2)} | ${fmt(m.perStreamHeapKiB, 2)} | ${marginal} | ${fmt(m.serverCpuPercentIdle)}`;
}

/** The floors' figure for the same measurement, for the targets table. */
function floorText(idle: IdleScenario | undefined, pick: (floor: IdleStreams) => IdleMeasure | undefined): string {
  const floors: [string, IdleStreams | undefined][] = [["node:http2 alone", idle?.floor], ["Connect alone", idle?.connectFloor]];
  return floors.map(([name, floor]) => {
    const m = floor && pick(floor);
    return m ? `; ${name}: ${m.perStreamKiB} KiB (heap ${m.perStreamHeapKiB} KiB)` : "";
  }).join("");
}
