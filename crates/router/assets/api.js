// The router's API: every request the page makes goes through `api`, same-origin with the session cookie and
// X-Requested-With, and the router's clock is tracked from its answers.

const REQUESTED_WITH = 'llm-router-dashboard';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Unreachable extends Error {}

/** Offset between the router's clock and this browser's, from the Date header, so "12 s ago" is right even when
 * the operator's laptop clock is off. Differences under two seconds are the header's rounding and are ignored. */
export let clockSkew = 0;

export function serverNow() {
  return Date.now() + clockSkew;
}

export async function api(method, path, body) {
  const init = {
    method,
    credentials: 'same-origin',
    cache: 'no-store',
    headers: { 'X-Requested-With': REQUESTED_WITH, Accept: 'application/json' },
  };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  let text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch (err) {
    throw new Unreachable(err instanceof Error ? err.message : String(err));
  }
  const date = Date.parse(response.headers.get('Date') ?? '');
  if (!Number.isNaN(date)) {
    const skew = date - Date.now();
    clockSkew = Math.abs(skew) > 2000 ? skew : 0;
  }
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    // A proxy in front of a stopped router answers 502-504 without our JSON error body.
    if (response.status >= 502 && response.status <= 504 && !data?.error) {
      throw new Unreachable(`the gateway answered ${response.status}`);
    }
    throw new ApiError(
      response.status,
      data?.error?.code ?? `http_${response.status}`,
      data?.error?.message ?? `The router answered ${response.status} ${response.statusText}.`,
    );
  }
  return data;
}
