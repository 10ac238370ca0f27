import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import type { Message } from "../../gen/parley/v1/message_pb.js";
import { NotificationSchema } from "../../gen/parley/v1/notification_pb.js";
import type { Bus } from "../bus/bus.js";
import type { Subjects } from "../bus/subjects.js";
import type { Logger } from "../observability/logger.js";
import type { Metrics } from "../observability/metrics.js";

type Event = MessageInitShape<typeof NotificationSchema>["event"];

/**
 * Publishes domain events after their transaction committed. A failed publish is logged and counted,
 * never thrown: the data is durable and clients catch up by sequence.
 */
export class Events {
  constructor(
    private readonly bus: Bus,
    private readonly subjects: Subjects,
    private readonly metrics: Metrics,
    private readonly log: Logger,
  ) {}

  /** Goes to the chat subject with the full message, so live delivery needs no database read. */
  messageCreated(tenant: string, message: Message): Promise<void> {
    return this.publish([this.subjects.chat(tenant, message.chatId)], message.chatId, messageCreatedEvent(message));
  }

  chatCreated(tenant: string, chatId: string, name: string, creatorId: string, memberIds: string[]): Promise<void> {
    return this.publish(
      memberIds.map((user) => this.subjects.user(tenant, user)),
      chatId,
      { case: "chatCreated", value: { chatId, name, creatorId } },
    );
  }

  /** To the chat (existing members) and to each added user, who is not listening to the chat yet. */
  async membersAdded(tenant: string, chatId: string, userIds: string[], addedBy: string): Promise<void> {
    for (const userId of userIds) {
      await this.publish([this.subjects.chat(tenant, chatId), this.subjects.user(tenant, userId)], chatId, {
        case: "memberAdded",
        value: { chatId, userId, addedBy },
      });
    }
  }

  /** To the remaining members (chat subject) and to the removed user. */
  memberRemoved(tenant: string, chatId: string, userId: string, removedBy: string): Promise<void> {
    return this.publish([this.subjects.chat(tenant, chatId), this.subjects.user(tenant, userId)], chatId, {
      case: "memberRemoved",
      value: { chatId, userId, removedBy },
    });
  }

  /** To the same user's other streams. */
  readUpdated(tenant: string, userId: string, chatId: string, readSequence: bigint): Promise<void> {
    return this.publish([this.subjects.user(tenant, userId)], chatId, {
      case: "readUpdated",
      value: { chatId, readSequence },
    });
  }

  private async publish(subjects: string[], chatId: string, event: Event): Promise<void> {
    const data = toBinary(NotificationSchema, create(NotificationSchema, { chatId, time: timestampNow(), event }));
    for (const subject of subjects) {
      try {
        await this.bus.publish(subject, data);
      } catch (error) {
        this.metrics.publishFailures.inc();
        this.log.warn({ err: error, subject }, "publish failed after commit; clients will catch up by sequence");
      }
    }
  }
}

/** MessageCreated with the full message: on the bus, and for a stream catching up from storage. */
export function messageCreatedEvent(message: Message): Event {
  const { chatId, id, sequence, senderId } = message;
  return { case: "messageCreated", value: { chatId, messageId: id, sequence, senderId, message } };
}
