/**
 * The raw WebSocket ceiling: a plain `ws` server that broadcasts each message to every connected
 * client as fast as the sockets drain (a message is serialised once and written to every socket).
 * Driven by bench/run.ts over IPC: {cmd: "run", durationMs, payloadBytes, phase} → {messages, deliveries}.
 */
import { WebSocketServer, type WebSocket } from "ws";

const clock = () => performance.timeOrigin + performance.now();
const server = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false });
const clients = new Set<WebSocket>();
server.on("connection", (ws) => {
  clients.add(ws);
  ws.on("close", () => clients.delete(ws));
  ws.on("error", () => clients.delete(ws));
});
server.on("listening", () => {
  const address = server.address();
  process.send?.({ type: "listening", port: typeof address === "object" && address ? address.port : 0 });
});

/** Pauses while any socket has more than this many bytes queued (backpressure). */
const HIGH_WATER = 256 * 1024;

async function run(args: { durationMs: number; payloadBytes: number; phase: string }) {
  const padding = "x".repeat(Math.max(0, args.payloadBytes - 40));
  const started = performance.now();
  let messages = 0;
  let deliveries = 0;
  while (performance.now() - started < args.durationMs) {
    let blocked = false;
    for (const ws of clients) {
      if (ws.bufferedAmount > HIGH_WATER) {
        blocked = true;
        break;
      }
    }
    if (blocked) {
      await new Promise((resolve) => setTimeout(resolve, 1));
      continue;
    }
    // A few messages per turn of the event loop, then let the sockets write.
    for (let k = 0; k < 4; k++) {
      const data = Buffer.from(`${args.phase}|${clock().toFixed(3)}|${messages}|${padding}`);
      for (const ws of clients) {
        ws.send(data, { binary: false });
        deliveries++;
      }
      messages++;
    }
    await new Promise((resolve) => setImmediate(resolve));
  }
  return { messages, deliveries, clients: clients.size, ms: performance.now() - started };
}

process.on("message", (message: { id: number; cmd: string; args: { durationMs: number; payloadBytes: number; phase: string } }) => {
  if (message.cmd !== "run") return;
  run(message.args).then(
    (result) => process.send?.({ id: message.id, ok: true, result }),
    (error) => process.send?.({ id: message.id, ok: false, error: String(error) }),
  );
});
process.on("disconnect", () => process.exit(0));
