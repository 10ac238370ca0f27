import { connect, Events, type NatsConnection } from "nats";
import { withDeadline } from "../deadline.js";
import { UnavailableError } from "../errors.js";
import type { Logger } from "../observability/logger.js";
import type { Bus } from "./bus.js";

/** NATS core pub/sub. Reconnects forever; while disconnected, publishes are buffered by the client. */
export class NatsBus implements Bus {
  connected = true;
  private readonly listeners = new Set<(connected: boolean) => void>();

  private constructor(private readonly nc: NatsConnection, private readonly log: Logger) {
    void this.watchStatus();
  }

  static async connect(servers: string, log: Logger): Promise<NatsBus> {
    const nc = await connect({
      servers: servers.split(",").map((s) => s.trim()),
      name: "parley",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      pingInterval: 10_000,
      timeout: 5_000,
    });
    log.info({ server: nc.getServer() }, "connected to NATS");
    return new NatsBus(nc, log);
  }

  private async watchStatus(): Promise<void> {
    for await (const status of this.nc.status()) {
      if (status.type === Events.Disconnect) {
        this.connected = false;
        this.log.warn({ server: status.data }, "NATS disconnected");
      } else if (status.type === Events.Reconnect) {
        this.connected = true;
        this.log.info({ server: status.data }, "NATS reconnected");
      } else {
        continue;
      }
      for (const listener of this.listeners) listener(this.connected);
    }
  }

  async publish(subject: string, data: Uint8Array): Promise<void> {
    this.nc.publish(subject, data);
  }

  subscribe(subject: string, onMessage: (data: Uint8Array) => void): () => void {
    const subscription = this.nc.subscribe(subject, {
      callback: (error, message) => {
        if (error) this.log.warn({ err: error, subject }, "NATS subscription error");
        else onMessage(message.data);
      },
    });
    return () => subscription.unsubscribe();
  }

  /** The server answers a PING after it has processed every SUB sent before it. */
  async flush(): Promise<void> {
    await this.nc.flush();
  }

  onConnectionChange(listener: (connected: boolean) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async ping(): Promise<void> {
    if (!this.connected || this.nc.isClosed()) throw new UnavailableError("NATS is not connected");
    await withDeadline(this.nc.flush(), 2000, "NATS ping");
  }

  async close(): Promise<void> {
    if (!this.nc.isClosed()) await this.nc.drain();
  }
}
