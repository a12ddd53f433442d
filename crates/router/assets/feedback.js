// What the page tells the operator outside the views: the banner, toasts and the confirmation dialog.

import { $, el, setText, toggleClass } from './dom.js';

export function setBanner(text) {
  const banner = $('banner');
  banner.hidden = !text;
  toggleClass(document.body, 'has-banner', Boolean(text));
  setText($('banner-text'), text);
}

export function confirmDialog({ title, text, confirm }) {
  const dialog = $('confirm');
  setText($('confirm-title'), title);
  setText($('confirm-text'), text);
  setText($('confirm-ok'), confirm);
  dialog.returnValue = '';
  dialog.showModal();
  $('confirm-cancel').focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'confirm'), { once: true });
  });
}

$('confirm-ok').addEventListener('click', () => $('confirm').close('confirm'));
$('confirm-cancel').addEventListener('click', () => $('confirm').close('cancel'));

export function toast(message, kind = 'info') {
  const item = el('div', { className: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  $('toasts').append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}
