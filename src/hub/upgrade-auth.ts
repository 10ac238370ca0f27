import type { Caller } from "../auth/caller.js";
import type { TokenVerifier } from "../auth/token-verifier.js";
import { UnauthenticatedError } from "../errors.js";

/**
 * The caller of a hub request: `authorization: Bearer` (Node and .NET clients) or, as browsers'
 * SignalR clients send it on the WebSocket URL, `?access_token=`. The header wins when both are sent.
 * Returns the error instead of throwing: a WebSocket is accepted first and told why afterwards.
 */
export async function authenticate(
  verifier: TokenVerifier,
  header: string | string[] | undefined,
  queryToken: string | null,
): Promise<Caller | UnauthenticatedError> {
  try {
    if (header !== undefined) return await verifier.verifyHeader(Array.isArray(header) ? header[0] : header);
    if (queryToken) return await verifier.verify(queryToken);
    return new UnauthenticatedError("missing bearer token (authorization: Bearer <JWT> or ?access_token=<JWT>)");
  } catch (error) {
    return error instanceof UnauthenticatedError ? error : new UnauthenticatedError("token could not be verified");
  }
}
