/** Fan-out transport between server instances. It only moves bytes: history lives in PostgreSQL. */
export interface Bus {
  publish(subject: string, data: Uint8Array): Promise<void>;
  /** Calls onMessage for every message on the subject until the returned function is called. */
  subscribe(subject: string, onMessage: (data: Uint8Array) => void): () => void;
  /** Resolves once every subscription made before the call receives what is published from then on. */
  flush(): Promise<void>;
  /** Throws when the bus cannot be reached. */
  ping(): Promise<void>;
  /** False while the connection to the bus is lost: events published meanwhile may never arrive. */
  readonly connected: boolean;
  /** Calls listener on every loss and every recovery of the connection. */
  onConnectionChange(listener: (connected: boolean) => void): () => void;
  close(): Promise<void>;
}
