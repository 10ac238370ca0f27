import { fromBinary } from "@bufbuild/protobuf";
import { NotificationSchema, type Notification } from "../../gen/parley/v1/notification_pb.js";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";
import type { Bus } from "./bus.js";

export type Listener = (event: Notification) => void;

/**
 * Local listeners of this instance, by subject. The instance holds one bus subscription per subject
 * that has at least one local listener, and drops it with the last one, so bus subscriptions and
 * memory are bounded by what local streams watch, not by the number of users or chats. Each event is
 * decoded once per instance, however many local streams receive it.
 */
export class Fanout {
  private readonly subjects = new Map<string, { listeners: Set<Listener>; unsubscribe: () => void }>();

  constructor(private readonly bus: Bus, private readonly metrics: Metrics, private readonly log: Logger) {}

  listen(subject: string, listener: Listener): () => void {
    let entry = this.subjects.get(subject);
    if (!entry) {
      const listeners = new Set<Listener>();
      const unsubscribe = this.bus.subscribe(subject, (data) => this.dispatch(subject, listeners, data));
      entry = { listeners, unsubscribe };
      this.subjects.set(subject, entry);
      this.metrics.busSubscriptions.set(this.subjects.size);
    }
    entry.listeners.add(listener);
    const current = entry;
    return () => {
      if (!current.listeners.delete(listener) || current.listeners.size > 0) return;
      current.unsubscribe();
      this.subjects.delete(subject);
      this.metrics.busSubscriptions.set(this.subjects.size);
    };
  }

  /** Resolves once every listener added so far receives what is published from then on. */
  active(): Promise<void> {
    return this.bus.flush();
  }

  /** Whether events flow now; see Bus.connected. */
  get connected(): boolean {
    return this.bus.connected;
  }

  /** Calls listener when the bus connection is lost (false) or back (true). */
  onConnectionChange(listener: (connected: boolean) => void): () => void {
    return this.bus.onConnectionChange(listener);
  }

  /** Bus subscriptions held now (for tests and metrics). */
  get subscriptionCount(): number {
    return this.subjects.size;
  }

  private dispatch(subject: string, listeners: Set<Listener>, data: Uint8Array): void {
    let event: Notification;
    try {
      event = fromBinary(NotificationSchema, data);
    } catch (error) {
      this.log.warn({ err: error, subject }, "undecodable bus event dropped");
      return;
    }
    for (const listener of listeners) listener(event);
  }
}
