// Fleet events: the banner of a mass silence and its dismissal.

import { $, setText } from './dom.js';
import { api, ApiError } from './api.js';
import { state } from './state.js';
import { toast } from './feedback.js';
import { load } from './live.js';

/** The banner of a mass silence (SPEC §10) while the latest fleet event is one that lasts. */
export function showSilence(event) {
  const lasting = event && event.kind === 'mass_silence' && !event.resolved_at ? event : null;
  state.silence = lasting;
  $('fleet-banner').hidden = !lasting;
  if (lasting) {
    const at = new Date(lasting.at).toLocaleTimeString();
    setText($('fleet-banner-text'), `Mass silence: ${lasting.nodes_affected} of ${lasting.nodes_live} nodes went `
      + `offline at once at ${at}. A network or router problem is likelier than ${lasting.nodes_affected} broken machines.`);
  }
}

$('fleet-banner-dismiss').addEventListener('click', async () => {
  const silence = state.silence;
  if (!silence) return;
  try {
    await api('POST', `/v0/fleet/events/${encodeURIComponent(silence.id)}/dismiss`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) {
      toast(`Dismissing failed: ${err.message}`, 'error');
      return;
    }
  }
  state.mutations += 1;
  showSilence(null);
  load();
});
