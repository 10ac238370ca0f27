import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { CONTROL_CHARACTER, isValidUserId, USER_ID_RULE } from "../auth/token-verifier.js";
import { InvalidArgumentError, type FieldViolation } from "../errors.js";

export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 200;
export const MAX_IDS_PER_REQUEST = 1000;
export const MAX_TEXT_LENGTH = 4096;
export const MAX_NAME_LENGTH = 200;
export const MAX_CLIENT_MESSAGE_ID_LENGTH = 64;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
/** 9999-12-31T23:59:59.999Z, the last stored time a google.protobuf.Timestamp can name. */
const LAST_MILLISECOND = 253402300799999;

/** Collects every bad field of a request, then throws them together as one INVALID_ARGUMENT. */
export class RequestCheck {
  private readonly violations: FieldViolation[] = [];

  fail(field: string, description: string): void {
    this.violations.push({ field, description });
  }

  /** Ids are UUIDs; stored lower-case. */
  id(field: string, value: string): string {
    if (value === "") this.fail(field, "required");
    else if (!UUID.test(value)) this.fail(field, "must be a UUID");
    return value.toLowerCase();
  }

  userId(field: string, value: string): string {
    if (!isValidUserId(value)) this.fail(field, USER_ID_RULE);
    return value;
  }

  userIds(field: string, values: string[]): string[] {
    if (values.length > MAX_IDS_PER_REQUEST) {
      this.fail(field, `at most ${MAX_IDS_PER_REQUEST} ids per request`);
      return values;
    }
    values.forEach((v, i) => this.userId(`${field}[${i}]`, v));
    return values;
  }

  text(field: string, value: string, options: { min: number; max: number }): string {
    const length = [...value].length;
    if (value.includes("\u0000")) this.fail(field, "must not contain NUL characters");
    else if (length < options.min) this.fail(field, options.min === 1 ? "required" : `at least ${options.min} characters`);
    else if (length > options.max) this.fail(field, `at most ${options.max} characters`);
    return value;
  }

  clientMessageId(field: string, value: string): string {
    if ([...value].length > MAX_CLIENT_MESSAGE_ID_LENGTH) this.fail(field, `at most ${MAX_CLIENT_MESSAGE_ID_LENGTH} characters`);
    else if (CONTROL_CHARACTER.test(value)) this.fail(field, "must not contain control characters");
    return value;
  }

  sequence(field: string, value: bigint): bigint {
    if (value < 0n) this.fail(field, "must not be negative");
    return value;
  }

  pageSize(value: number): number {
    if (value < 0) this.fail("page_size", "must not be negative");
    return value <= 0 ? DEFAULT_PAGE_SIZE : Math.min(value, MAX_PAGE_SIZE);
  }

  time(field: string, value: Timestamp | undefined): Date | undefined {
    if (value === undefined) return undefined;
    const seconds = Number(value.seconds);
    // The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31.
    if (seconds < -62135596800 || seconds > 253402300799 || value.nanos < 0 || value.nanos > 999_999_999) {
      this.fail(field, "not a valid timestamp");
      return undefined;
    }
    // Stored times have millisecond precision: rounding up keeps both bounds exact ("t >= start", "t < end"),
    // except in the last millisecond of 9999: year 10000 would reach PostgreSQL as "+010000-…", which it cannot parse.
    return new Date(Math.min(seconds * 1000 + Math.ceil(value.nanos / 1_000_000), LAST_MILLISECOND));
  }

  /** Throws INVALID_ARGUMENT naming every bad field seen so far. */
  done(): void {
    if (this.violations.length > 0) throw new InvalidArgumentError(this.violations);
  }
}
