// A page's refresh while it is shown: `load` every `ms` (skipped while the browser tab is hidden), and at once when
// the tab comes back into view. The usage and deployments pages use one each.

/** A refresher of `load` while `shown()`; `start()` when the page is shown, `stop()` when it is left. */
export function refresher(load, shown, ms) {
  let timer = null;
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (!shown()) return;
      if (!document.hidden) await load();
      if (shown()) schedule();
    }, ms);
  }
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && shown()) load();
  });
  return {
    start: schedule,
    stop() {
      clearTimeout(timer);
      timer = null;
    },
  };
}
