import net from "node:net";
import {
  HttpTransportType, HubConnectionBuilder, LogLevel, type HubConnection, type IRetryPolicy,
} from "@microsoft/signalr";
import WebSocket from "ws";

export const HUB_TARGETS = ["Ready", "MessageCreated", "ChatCreated", "MemberAdded", "MemberRemoved", "ReadUpdated"] as const;
export type HubTarget = (typeof HUB_TARGETS)[number];

export interface HubEvent {
  target: HubTarget;
  // Hub events are plain proto3 JSON.
  arg: any;
}

export interface HubClientOptions {
  /** Negotiate first (default) or go straight to the WebSocket. */
  negotiate?: boolean;
  /** Called for every (re)connect; may delay a reconnect by not resolving yet. */
  accessTokenFactory?: () => Promise<string>;
  reconnect?: IRetryPolicy;
  keepAliveMs?: number;
}

/** The official @microsoft/signalr client, recording every server → client invocation. */
export class HubClient {
  readonly events: HubEvent[] = [];
  private taken = new Set<number>();

  private constructor(readonly connection: HubConnection) {
    for (const target of HUB_TARGETS) {
      connection.on(target, (arg: unknown) => this.events.push({ target, arg }));
    }
  }

  static build(baseUrl: string, token: string, options: HubClientOptions = {}): HubClient {
    let builder = new HubConnectionBuilder()
      .withUrl(`${baseUrl}/hubs/chat`, {
        accessTokenFactory: options.accessTokenFactory ?? (() => token),
        skipNegotiation: options.negotiate === false,
        transport: HttpTransportType.WebSockets,
      })
      .configureLogging(LogLevel.None);
    if (options.reconnect) builder = builder.withAutomaticReconnect(options.reconnect);
    if (options.keepAliveMs) builder = builder.withKeepAliveInterval(options.keepAliveMs);
    return new HubClient(builder.build());
  }

  /** Builds, starts and waits for Ready. */
  static async connect(baseUrl: string, token: string, options: HubClientOptions = {}): Promise<HubClient> {
    const client = HubClient.build(baseUrl, token, options);
    await client.connection.start();
    await client.next("Ready");
    return client;
  }

  /** The first event not taken yet with this target (and matching `match`), waiting up to timeoutMs. */
  async next(target: HubTarget, match: (arg: any) => boolean = () => true, timeoutMs = 5000): Promise<any> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.events.findIndex((e, i) => !this.taken.has(i) && e.target === target && match(e.arg));
      if (index >= 0) {
        this.taken.add(index);
        return this.events[index]!.arg;
      }
      if (Date.now() > deadline) throw new Error(`no ${target} event within ${timeoutMs} ms (got ${JSON.stringify(this.events)})`);
      await sleep(10);
    }
  }

  stop(): Promise<void> {
    return this.connection.stop();
  }
}

export interface RawOpenOptions {
  path?: string;
  headers?: Record<string, string>;
}

/** A bare `ws` client speaking the hub protocol by hand, to send what well-behaved clients never send. */
export class RawHub {
  private records: string[] = [];
  private partial = "";
  closeCode: number | undefined;
  closeReason = "";
  readonly closed: Promise<void>;

  private constructor(readonly ws: WebSocket) {
    ws.on("message", (data: Buffer) => {
      const parts = (this.partial + data.toString("utf8")).split("\x1e");
      this.partial = parts.pop() ?? "";
      this.records.push(...parts);
    });
    this.closed = new Promise((resolve) => {
      ws.on("close", (code: number, reason: Buffer) => {
        this.closeCode = code;
        this.closeReason = reason.toString();
        resolve();
      });
    });
    ws.on("error", () => {});
  }

  /** Opens the WebSocket; rejects with the HTTP status when the upgrade is refused. */
  static open(baseUrl: string, options: RawOpenOptions = {}): Promise<RawHub> {
    const url = `${baseUrl.replace(/^http/, "ws")}${options.path ?? "/hubs/chat"}`;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { headers: options.headers });
      const hub = new RawHub(ws);
      ws.once("open", () => resolve(hub));
      ws.once("unexpected-response", (_req, res) => {
        reject(Object.assign(new Error(`upgrade refused: ${res.statusCode}`), { status: res.statusCode }));
        ws.terminate();
      });
      ws.once("error", reject);
    });
  }

  /** Opens and completes the handshake. */
  static async connect(baseUrl: string, token: string): Promise<RawHub> {
    const hub = await RawHub.open(baseUrl, { headers: { authorization: `Bearer ${token}` } });
    hub.send({ protocol: "json", version: 1 });
    const response = await hub.next();
    if (JSON.stringify(response) !== "{}") throw new Error(`handshake failed: ${JSON.stringify(response)}`);
    return hub;
  }

  send(value: unknown): void {
    this.ws.send(typeof value === "string" ? value : JSON.stringify(value) + "\x1e");
  }

  /** The next record (parsed), skipping pings unless asked for. */
  async next(options: { pings?: boolean; timeoutMs?: number } = {}): Promise<any> {
    const deadline = Date.now() + (options.timeoutMs ?? 5000);
    for (;;) {
      const text = this.records.shift();
      if (text !== undefined) {
        const record = JSON.parse(text);
        if (record.type === 6 && !options.pings) continue;
        return record;
      }
      if (this.closeCode !== undefined) throw new Error(`socket closed (${this.closeCode}) with no further record`);
      if (Date.now() > deadline) throw new Error("no record in time");
      await sleep(10);
    }
  }

  /** The first record of a given type, skipping others (events, pings). */
  async nextOfType(type: number, timeoutMs = 5000): Promise<any> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const record = await this.next({ pings: true, timeoutMs: Math.max(1, deadline - Date.now()) });
      if (record.type === type) return record;
    }
  }

  /** Waits for the socket to close. */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    await Promise.race([
      this.closed,
      sleep(timeoutMs).then(() => {
        throw new Error("socket did not close in time");
      }),
    ]);
  }

  close(): void {
    this.ws.terminate();
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A port nothing listens on right now. */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
