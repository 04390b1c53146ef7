/**
 * Asking the dispatcher which gateways to use:
 * `GET {url}/v1/dispatch?app=&user=&net=&region=&transport=`, answered
 * `{"gateways": [url, ...]}`, best first. For the ws and wss transports
 * the list holds full URLs (`wss://host:port/v1/connect`).
 */

/** Where to ask which gateways to use, and for whom. */
export interface DispatchOptions {
  /** The API's base URL, e.g. `https://api.example.com`. */
  url: string;
  app: string;
  user: string;
  region?: string | undefined;
  /** The transport the gateways are wanted for (default `wss`). */
  transport?: "ws" | "wss" | undefined;
}

/** The least of `fetch` this module uses, so any implementation can be passed in. */
export type FetchLike = (
  url: string,
  init: { signal?: AbortSignal; headers?: Record<string, string> },
) => Promise<{ ok: boolean; status: number; json(): Promise<unknown> }>;

/** The `net` query value for a network type, as the Rust SDK sends it (none for unknown). */
export function dispatchNet(network: string): string | undefined {
  switch (network) {
    case "wifi":
    case "wired":
      return "wifi";
    case "cellular":
    case "4g":
    // Dispatchers before `wired` and `5g` refuse them; both are served as
    // wifi and 4g are, so those are what the client asks for.
    case "5g":
      return "4g";
    case "3g":
    case "2g":
      return network;
    default:
      return undefined;
  }
}

export function dispatchUrl(dispatch: DispatchOptions, network: string): string {
  const query = new URLSearchParams();
  query.set("app", dispatch.app);
  query.set("user", dispatch.user);
  const net = dispatchNet(network);
  if (net !== undefined) query.set("net", net);
  if (dispatch.region !== undefined) query.set("region", dispatch.region);
  query.set("transport", dispatch.transport ?? "wss");
  return `${dispatch.url.replace(/\/+$/, "")}/v1/dispatch?${query.toString()}`;
}

/** Whether `url` is a ws: or wss: URL. */
export function isWebSocketUrl(url: string): boolean {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "ws:" || parsed.protocol === "wss:";
  } catch {
    return false;
  }
}

/**
 * Asks the dispatcher; resolves with the gateways' URLs, best first, or
 * rejects with an Error that says why (no answer within `timeoutMs`, an
 * HTTP error, an answer without a usable ws/wss URL).
 */
export async function askDispatcher(
  fetchFn: FetchLike,
  dispatch: DispatchOptions,
  network: string,
  timeoutMs: number,
  timers: { setTimeout(fn: () => void, ms: number): unknown; clearTimeout(handle: unknown): void },
): Promise<string[]> {
  const abort = new AbortController();
  const timer = timers.setTimeout(() => abort.abort(), timeoutMs);
  try {
    let response;
    let answer: unknown;
    try {
      response = await fetchFn(dispatchUrl(dispatch, network), {
        signal: abort.signal,
        headers: { accept: "application/json" },
      });
      if (!response.ok) throw new Error(`dispatcher answered HTTP ${response.status}`);
      answer = await response.json();
    } catch (error) {
      if (abort.signal.aborted) throw new Error(`dispatcher did not answer within ${timeoutMs} ms`);
      throw error instanceof Error ? error : new Error(String(error));
    }
    const gateways = (answer as { gateways?: unknown } | null)?.gateways;
    if (!Array.isArray(gateways)) throw new Error("dispatcher answer has no gateways list");
    const usable = gateways.filter((g): g is string => typeof g === "string" && isWebSocketUrl(g));
    if (usable.length === 0) {
      throw new Error(`dispatcher named no ws:// or wss:// gateway (${JSON.stringify(gateways).slice(0, 200)})`);
    }
    return usable;
  } finally {
    timers.clearTimeout(timer);
  }
}
