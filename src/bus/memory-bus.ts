import type { Bus } from "./bus.js";

/** The single-instance bus used when NATS_URL is unset. Delivery is asynchronous, like NATS. */
export class MemoryBus implements Bus {
  private readonly handlers = new Map<string, Set<(data: Uint8Array) => void>>();

  async publish(subject: string, data: Uint8Array): Promise<void> {
    const handlers = this.handlers.get(subject);
    if (!handlers) return;
    for (const handler of [...handlers]) queueMicrotask(() => handler(data));
  }

  subscribe(subject: string, onMessage: (data: Uint8Array) => void): () => void {
    let handlers = this.handlers.get(subject);
    if (!handlers) this.handlers.set(subject, (handlers = new Set()));
    const handler = (data: Uint8Array) => onMessage(data);
    handlers.add(handler);
    return () => {
      handlers.delete(handler);
      if (handlers.size === 0 && this.handlers.get(subject) === handlers) this.handlers.delete(subject);
    };
  }

  /** Subscriptions here are active at once. */
  async flush(): Promise<void> {}

  async ping(): Promise<void> {}

  /** In-process delivery cannot be interrupted. */
  readonly connected = true;

  onConnectionChange(): () => void {
    return () => {};
  }

  async close(): Promise<void> {
    this.handlers.clear();
  }
}
