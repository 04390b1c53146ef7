/**
 * The WebSocket implementation: the one passed in the options, else the
 * global `WebSocket` (browsers, Node 22+, Deno, Bun), else the `ws` package
 * loaded with a dynamic import (Node 20 and 21, which have no global one).
 * Browsers never load `ws`: the import's specifier is not a literal, so
 * bundlers leave it alone.
 */

/** The part of a WebSocket (browser or `ws`) this SDK uses. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** readyState of an open WebSocket. */
export const WS_OPEN = 1;

export async function resolveWebSocket(given: WebSocketConstructor | undefined): Promise<WebSocketConstructor> {
  if (given !== undefined) return given;
  const global = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (typeof global === "function") return global as WebSocketConstructor;
  const specifier = "ws";
  try {
    const module = (await import(/* webpackIgnore: true */ /* @vite-ignore */ specifier)) as {
      default?: unknown;
      WebSocket?: unknown;
    };
    const found = module.WebSocket ?? module.default;
    if (typeof found === "function") return found as WebSocketConstructor;
  } catch {
    // Not installed: the error below says what to do.
  }
  throw new Error(
    "herald-client: there is no global WebSocket here and the ws package could not be loaded; " +
      "install it (npm install ws) or pass the WebSocket option",
  );
}
