/**
 * Publishes each chat's MessageCreated events in sequence order. Sends to one chat commit in sequence
 * order (the chat row lock), but their replies come back on different database connections and can
 * reach this process in any order. So a finished send's event waits for the sends to the same chat
 * that were still running when it finished (they may hold lower sequences), and the waiting events go
 * out lowest sequence first. A send that started after another finished always gets a higher
 * sequence, so nothing else needs to wait. Order across instances rests on NATS and `sequence`.
 */
export class PublishOrder {
  private readonly chats = new Map<string, ChatSends>();

  /** Call just before the send's statement; then exactly one of the turn's publish or skip. */
  enter(chatKey: string): PublishTurn {
    let chat = this.chats.get(chatKey);
    if (chat === undefined) this.chats.set(chatKey, (chat = { running: new Set(), finished: [] }));
    const turn: Turn = { sequence: 0n, waitsFor: new Set(), publish: () => undefined };
    chat.running.add(turn);
    return {
      publish: (sequence, publish) =>
        new Promise<void>((resolve, reject) => {
          chat.running.delete(turn);
          turn.sequence = sequence;
          turn.waitsFor = new Set(chat.running);
          turn.publish = () => void publish().then(resolve, reject);
          const at = chat.finished.findIndex((other) => other.sequence > sequence);
          chat.finished.splice(at === -1 ? chat.finished.length : at, 0, turn);
          this.flush(chatKey, chat);
        }),
      skip: () => {
        chat.running.delete(turn);
        this.flush(chatKey, chat);
      },
    };
  }

  private flush(chatKey: string, chat: ChatSends): void {
    for (;;) {
      const next = chat.finished[0];
      if (next === undefined) break;
      for (const other of next.waitsFor) if (!chat.running.has(other)) next.waitsFor.delete(other);
      if (next.waitsFor.size > 0) break;
      chat.finished.shift();
      // Called in order: each publish hands its message to the bus before it first awaits.
      next.publish();
    }
    if (chat.running.size === 0 && chat.finished.length === 0) this.chats.delete(chatKey);
  }
}

export interface PublishTurn {
  /** Publishes once every event it must follow is out; resolves when its own publish has settled. */
  publish(sequence: bigint, publish: () => Promise<void>): Promise<void>;
  /** The send failed or stored nothing new: there is nothing to publish. */
  skip(): void;
}

interface Turn {
  sequence: bigint;
  /** Sends to the chat that were running when this one finished. */
  waitsFor: Set<Turn>;
  publish: () => void;
}

interface ChatSends {
  running: Set<Turn>;
  /** Finished sends waiting to publish, lowest sequence first. */
  finished: Turn[];
}
