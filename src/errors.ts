import { Code, ConnectError } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { BadRequestSchema, RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import type { Logger } from "./observability/logger.js";

/** Domain errors: services throw these; toConnectError is the one place that maps them to codes. */
export class NotFoundError extends Error {
  constructor(what: string) {
    super(`${what} not found`);
  }
}

export interface FieldViolation {
  field: string;
  description: string;
}

export class InvalidArgumentError extends Error {
  constructor(readonly violations: FieldViolation[]) {
    // No ":" or ";" in the text: grpc-js shows those percent-encoded in grpc-message.
    super(violations.map((v) => `invalid ${v.field} (${v.description})`).join(" and "));
  }
  static field(field: string, description: string): InvalidArgumentError {
    return new InvalidArgumentError([{ field, description }]);
  }
}

export class UnauthenticatedError extends Error {}

export class ResourceExhaustedError extends Error {
  constructor(message: string, readonly retryAfterMs?: number) {
    super(message);
  }
}

export class UnavailableError extends Error {}

/** Connection-level failures of PostgreSQL or NATS: the caller may retry. */
const unavailableErrorCodes = new Set([
  "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EHOSTUNREACH",
  "CONNECTION_CLOSED", "CONNECTION_ENDED", "CONNECTION_DESTROYED", "CONNECT_TIMEOUT",
  "57P01", "57P02", "57P03", "53300", "08000", "08001", "08003", "08006", "57014",
]);

/** Writes to a stream the client already reset or closed: nothing went wrong on our side. */
const clientGoneCodes = new Set([
  "ERR_HTTP2_INVALID_STREAM", "ERR_HTTP2_STREAM_CANCEL", "ERR_HTTP2_STREAM_ERROR",
  "ERR_STREAM_DESTROYED", "ERR_STREAM_PREMATURE_CLOSE", "ERR_STREAM_WRITE_AFTER_END",
]);

/** Refusals at connect that an operator must fix (credentials, database name): logged as errors. */
const misconfigurationCodes = new Set(["28000", "28P01", "3D000"]);

/**
 * PostgreSQL ends the session after a FATAL error: at connect, a database that refuses connections,
 * does not exist or rejects the credentials is as unreachable to the caller as a stopped server.
 */
function isFatalPostgresError(error: unknown): boolean {
  const { name, severity } = (error ?? {}) as { name?: unknown; severity?: unknown };
  return name === "PostgresError" && (severity === "FATAL" || severity === "PANIC");
}

export function isUnavailable(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return error instanceof UnavailableError || (typeof code === "string" && unavailableErrorCodes.has(code)) ||
    isFatalPostgresError(error);
}

export function toConnectError(error: unknown, log: Logger): ConnectError {
  if (error instanceof ConnectError) {
    // Connect's own errors (deadline, cancel, limits) already carry the right code.
    return error;
  }
  if (error instanceof Error && error.name === "AbortError") return new ConnectError("canceled", Code.Canceled);
  if (clientGoneCodes.has((error as { code?: string } | null)?.code ?? "")) {
    return new ConnectError("the client went away", Code.Canceled);
  }
  if (error instanceof NotFoundError) return new ConnectError(error.message, Code.NotFound);
  if (error instanceof InvalidArgumentError) {
    const detail = create(BadRequestSchema, {
      fieldViolations: error.violations.map((v) => ({ field: v.field, description: v.description })),
    });
    return new ConnectError(error.message, Code.InvalidArgument, undefined, [{ desc: BadRequestSchema, value: detail }]);
  }
  if (error instanceof UnauthenticatedError) return new ConnectError(error.message, Code.Unauthenticated);
  if (error instanceof ResourceExhaustedError) {
    const details =
      error.retryAfterMs === undefined
        ? []
        : [{ desc: RetryInfoSchema, value: create(RetryInfoSchema, { retryDelay: duration(error.retryAfterMs) }) }];
    return new ConnectError(error.message, Code.ResourceExhausted, undefined, details);
  }
  if (isUnavailable(error)) {
    const misconfigured = misconfigurationCodes.has((error as { code?: string }).code ?? "");
    if (misconfigured) log.error({ err: describe(error) }, "database refuses Parley's connection: check DATABASE_URL");
    else log.warn({ err: describe(error) }, "dependency unavailable");
    return new ConnectError("service temporarily unavailable (retry)", Code.Unavailable);
  }
  log.error({ err: error }, "internal error");
  return new ConnectError("internal error", Code.Internal);
}

function duration(ms: number) {
  const seconds = Math.floor(ms / 1000);
  return { seconds: BigInt(seconds), nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

function describe(error: unknown): string {
  return error instanceof Error ? `${(error as { code?: string }).code ?? ""} ${error.message}`.trim() : String(error);
}
