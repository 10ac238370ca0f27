import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { Code, ConnectError, createConnectRouter, createContextValues } from "@connectrpc/connect";
import { compressionBrotli, compressionGzip, universalRequestFromNodeRequest, universalResponseToNodeResponse } from "@connectrpc/connect-node";
import type { UniversalHandler } from "@connectrpc/connect/protocol";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { ServerReflection as ReflectionV1 } from "../gen/grpc/reflection/v1/reflection_pb.js";
import { ServerReflection as ReflectionV1alpha } from "../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { TokenVerifier } from "./auth/token-verifier.js";
import type { Bus } from "./bus/bus.js";
import { Fanout } from "./bus/fanout.js";
import { MemoryBus } from "./bus/memory-bus.js";
import { NatsBus } from "./bus/nats-bus.js";
import { Subjects } from "./bus/subjects.js";
import type { Config } from "./config.js";
import { parleyServices, registerParley } from "./connect.js";
import { createDemo } from "./demo/demo.js";
import { registerHealth } from "./grpc/health.js";
import { registerReflection } from "./grpc/reflection.js";
import { CorsPolicy } from "./hub/cors.js";
import { createHub } from "./hub/hub.js";
import { createLogger, type Logger } from "./observability/logger.js";
import { Metrics } from "./observability/metrics.js";
import { Chats } from "./services/chats.js";
import { Events } from "./services/events.js";
import { Members } from "./services/members.js";
import { Messages } from "./services/messages.js";
import { Notifications } from "./services/notifications.js";
import { PageTokens } from "./services/page-token.js";
import { RateLimiter } from "./services/rate-limiter.js";
import { StreamSlots } from "./services/stream-slots.js";
import { ChatStore } from "./store/chat-store.js";
import { openDatabase } from "./store/database.js";
import { MemberStore } from "./store/member-store.js";
import { MessageStore } from "./store/message-store.js";
import { loadServerSecret } from "./store/server-secrets.js";
import { rejectUndecodableBody, rejectUndecodableStreamMessages, withBodyCheck } from "./transport/body-check.js";
import { rpcCors } from "./transport/cors.js";
import { grpcFlavour } from "./transport/content-types.js";
import { fromGrpcWebText, toGrpcWebText } from "./transport/grpc-web-text.js";
import { assignRequestId, authenticate, failFast, mapErrors, observe } from "./transport/interceptors.js";
import { nodeResponseKey } from "./transport/stream-output.js";
import { createHttpServers } from "./transport/one-port.js";

/** How often a quiet WatchMessages stream re-checks storage and membership. */
const WATCH_RESYNC_MS = 15_000;
/** After shutdown began, how long a stream may take to end before it is cut off at the transport. */
const STALLED_STREAM_GRACE_MS = 1000;

export interface ParleyServer {
  /** The port actually bound (useful with PARLEY_PORT=0). */
  port: number;
  log: Logger;
  metrics: Metrics;
  fanout: Fanout;
  /** Graceful shutdown: stop accepting, end streams with UNAVAILABLE, finish in-flight RPCs, close pools. */
  close(): Promise<void>;
}

/** Builds every part of Parley from the config and listens on one port. */
export async function startServer(config: Config, log: Logger = createLogger(config.logLevel)): Promise<ParleyServer> {
  const metrics = new Metrics();
  const verifier = await TokenVerifier.create(config, log);
  // The demo page at / (PARLEY_DEMO), and its sign-in in development mode.
  const demo = config.demo.enabled ? await createDemo(config, log) : undefined;
  const db = await openDatabase(config, log);
  let bus: Bus;
  try {
    bus = config.natsUrl ? await NatsBus.connect(config.natsUrl, log) : new MemoryBus();
  } catch (error) {
    await db.close();
    throw error;
  }
  const subjects = new Subjects(config.natsPrefix);
  const fanout = new Fanout(bus, metrics, log);
  const events = new Events(bus, subjects, metrics, log);
  const pageTokens = new PageTokens(await loadServerSecret(db.sql, "page_token_key"));
  const hubSecret = await loadServerSecret(db.sql, "hub_connection_key");
  const members = new MemberStore(db);
  const streamSlots = new StreamSlots(config.maxStreamsPerUser);
  const messageStore = new MessageStore(db, (sends, seconds) => {
    metrics.sendStatementSends.observe(sends);
    metrics.sendStatementDuration.observe(seconds);
  });
  const storageTimeoutMs = config.dbTimeoutSeconds * 1000 + 500;
  const services = {
    chats: new Chats(new ChatStore(db), events, pageTokens, config.maxMembers),
    members: new Members(members, events, pageTokens, config.maxMembers),
    messages: new Messages(
      messageStore, members, events, fanout, subjects, pageTokens,
      new RateLimiter(config.sendRatePerSecond, config.sendBurst), metrics,
      { queueLimit: config.streamQueueLimit, watchResyncMs: WATCH_RESYNC_MS, storageTimeoutMs }, streamSlots,
    ),
    notifications: new Notifications(members, messageStore, fanout, subjects, metrics, {
      heartbeatSeconds: config.heartbeatSeconds,
      queueLimit: config.streamQueueLimit,
      storageTimeoutMs,
    }, streamSlots),
  };

  const isReady = async () => {
    try {
      await Promise.all([db.ping(), bus.ping()]);
      return true;
    } catch {
      return false;
    }
  };

  const shutdown = new AbortController();
  const router = createConnectRouter({
    readMaxBytes: config.maxRequestBytes,
    acceptCompression: [compressionGzip, compressionBrotli],
    interceptors: [observe(metrics, log), mapErrors(log), rejectUndecodableBody, rejectUndecodableStreamMessages],
  });
  const parleyRouter = createConnectRouter({
    readMaxBytes: config.maxRequestBytes,
    acceptCompression: [compressionGzip, compressionBrotli],
    interceptors: [
      observe(metrics, log), mapErrors(log), failFast(storageTimeoutMs),
      authenticate(verifier), rejectUndecodableBody, rejectUndecodableStreamMessages,
    ],
  });
  registerParley(parleyRouter, services);
  const openServices = [Health, ...(config.reflection ? [ReflectionV1, ReflectionV1alpha] : [])];
  registerHealth(router, {
    isServing: isReady,
    serviceNames: [...parleyServices, ...openServices].map((s) => s.typeName),
    signal: shutdown.signal,
  });
  if (config.reflection) registerReflection(router, [...parleyServices, ...openServices]);

  const rpcs = new Map<string, UniversalHandler>();
  const streamingPaths = new Set<string>();
  for (const handler of [...parleyRouter.handlers, ...router.handlers]) {
    rpcs.set(handler.requestPath, withBodyCheck(handler, config.maxRequestBytes));
    if (handler.method.methodKind === "server_streaming") streamingPaths.add(handler.requestPath);
  }
  const streamContext = (res: http.ServerResponse | http2.Http2ServerResponse) => createContextValues().set(nodeResponseKey, res);

  // Browser apps on other origins (PARLEY_CORS_ORIGINS).
  const corsForRpc = rpcCors(new CorsPolicy(config.corsOrigins));

  const handle = (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => {
    const path = (req.url ?? "/").split("?", 1)[0]!;
    const rpc = rpcs.get(path);
    const flavour = grpcFlavour(req.headers["content-type"] ?? "");
    if (rpc) {
      if (corsForRpc(req, res)) return;
      assignRequestId(req, res);
      const uReq = universalRequestFromNodeRequest(req, res, undefined, streamingPaths.has(path) ? streamContext(res) : undefined);
      const text = flavour === "grpc-web-text";
      rpc(text ? fromGrpcWebText(uReq, config.maxRequestBytes) : uReq)
        .then((uRes) => universalResponseToNodeResponse(text ? toGrpcWebText(uRes) : uRes, res))
        .catch((error) => {
          if (ConnectError.from(error).code !== Code.Aborted) log.warn({ err: error, path }, "response failed");
        });
      return;
    }
    // Unknown methods: gRPC clients get UNIMPLEMENTED, and browsers the CORS answers that let them see it.
    if (flavour || (req.method === "OPTIONS" && RPC_PATH.test(path))) {
      if (!corsForRpc(req, res)) unimplemented(res, flavour ?? "grpc", path);
      return;
    }
    void handleHttp(path, req, res);
  };

  const handleHttp = async (path: string, req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) => {
    // Probes: GET, or HEAD as some load balancers send.
    const probe = req.method === "GET" || req.method === "HEAD";
    if (probe && path === "/healthz") return send(res, 200, "text/plain", "ok\n");
    if (probe && path === "/readyz") {
      const ready = !shutdown.signal.aborted && (await isReady());
      return send(res, ready ? 200 : 503, "text/plain", ready ? "ready\n" : "not ready\n");
    }
    if (req.method === "GET" && path === "/metrics") {
      return send(res, 200, metrics.registry.contentType, await metrics.registry.metrics());
    }
    if (hub.handleHttp(req, res)) return;
    if (demo && (await demo.handle(path, req, res))) return;
    send(res, 404, "text/plain", "not found\n");
  };

  const { http1, h2c, server } = createHttpServers(handle);
  const hub = createHub({ http1, verifier, services, config, log, metrics, secret: hubSecret });
  const sessions = new Set<http2.ServerHttp2Session>();
  h2c.on("session", (session: http2.ServerHttp2Session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
  });
  const connections = new Set<net.Socket>();
  // HTTP/1.1 keep-alive sockets with no request in flight can be closed at once on shutdown (the
  // server's own idle tracking only works for servers that listen themselves).
  const inFlight = new Map<net.Socket, number>();
  http1.on("connection", (socket: net.Socket) => inFlight.set(socket, 0));
  // WebSocket sockets belong to the hub, which closes them itself on shutdown.
  http1.on("upgrade", (req: http.IncomingMessage) => inFlight.delete(req.socket));
  http1.on("request", (req: http.IncomingMessage, res: http.ServerResponse) => {
    const socket = req.socket;
    inFlight.set(socket, (inFlight.get(socket) ?? 0) + 1);
    res.on("close", () => {
      const left = (inFlight.get(socket) ?? 1) - 1;
      inFlight.set(socket, left);
      if (left === 0 && shutdown.signal.aborted) socket.destroySoon();
    });
  });
  server.on("connection", (socket: net.Socket) => {
    connections.add(socket);
    socket.on("close", () => {
      connections.delete(socket);
      inFlight.delete(socket);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error) => {
      const address = net.isIPv6(config.host) ? `[${config.host}]:${config.port}` : `${config.host}:${config.port}`;
      reject(new Error(`cannot listen on ${address} (PARLEY_HOST, PARLEY_PORT): ${error.message}`, { cause: error }));
    });
    server.listen(config.port, config.host, () => resolve());
  });
  const address = server.address() as net.AddressInfo;
  log.info({ host: config.host, port: address.port, database: config.databaseUrl ? "postgres" : "embedded", bus: config.natsUrl ? "nats" : "in-process" }, "parley listening");

  let closing: Promise<void> | undefined;
  return {
    port: address.port,
    log,
    metrics,
    fanout,
    close() {
      closing ??= (async () => {
        log.info("shutting down");
        const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
        const unavailable = new ConnectError("server shutting down (reconnect)", Code.Unavailable);
        shutdown.abort(unavailable);
        streamSlots.closeAll(unavailable);
        // Streams end at once; one still open a moment later has a client that stopped reading.
        const stalled = setTimeout(() => streamSlots.cutOffAll(unavailable), STALLED_STREAM_GRACE_MS);
        const hubClosed = hub.close();
        for (const [socket, count] of inFlight) if (count === 0) socket.destroySoon();
        const deadline = setTimeout(() => {
          for (const socket of connections) socket.destroy();
        }, config.shutdownTimeoutSeconds * 1000);
        // HTTP/2 sessions: GOAWAY lets in-flight streams finish, refuses new ones, then closes.
        h2c.close();
        for (const session of sessions) session.close();
        await hubClosed;
        await closeWhenIdle(connections);
        await stopped;
        clearTimeout(deadline);
        clearTimeout(stalled);
        await bus.close();
        await db.close();
        log.info("stopped");
      })();
      return closing;
    },
  };
}

/** `/package.Service/Method`: what an RPC's path looks like, known or not. */
const RPC_PATH = /^\/[A-Za-z_][\w.]*\.[A-Za-z_]\w*\/[A-Za-z_]\w*$/;

const responseContentTypes = {
  grpc: "application/grpc",
  "grpc-web": "application/grpc-web+proto",
  "grpc-web-text": "application/grpc-web-text+proto",
};

/**
 * gRPC clients expect an unknown method as status UNIMPLEMENTED, not HTTP 404 (which grpcio, for one,
 * reports with a parse error): a trailers-only response, the status in the headers. The Connect
 * protocol keeps its plain 404.
 */
function unimplemented(res: http.ServerResponse | http2.Http2ServerResponse, flavour: keyof typeof responseContentTypes, path: string) {
  // Headers set, not written: end() then sends them with the end of the stream (HTTP/2 trailers-only).
  res.setHeader("content-type", responseContentTypes[flavour]);
  res.setHeader("grpc-status", String(Code.Unimplemented));
  // Percent-encoded as gRPC has it (only "%" and what is not printable ASCII), so clients show it as is.
  res.setHeader("grpc-message", `unknown method ${path}`.replace(/[^\x20-\x24\x26-\x7e]/g, encodeURIComponent));
  res.end();
}

function send(res: http.ServerResponse | http2.Http2ServerResponse, status: number, contentType: string, body: string) {
  (res as http.ServerResponse).writeHead(status, { "content-type": contentType, "cache-control": "no-store" });
  // HTTP/1.1 drops a HEAD response's body itself; HTTP/2 has ended the stream with the headers.
  res.end(res.req.method === "HEAD" ? "" : body);
}

/** Resolves once every connection has closed. */
async function closeWhenIdle(connections: Set<net.Socket>): Promise<void> {
  while (connections.size > 0) await new Promise((resolve) => setTimeout(resolve, 20));
}
