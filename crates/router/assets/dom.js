// DOM helpers: text only. Every string that comes from the router reaches the page through these (textContent,
// Element.append(string), properties such as title); markup is never parsed from data.

export const $ = (id) => document.getElementById(id);

/** Creates an element. `props` sets properties (className, title, type...) or, for aria-* and role, attributes;
 * children are elements or strings, and strings become text nodes. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else if (key.startsWith('aria-') || key === 'role') node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

/** Sets an element's text only when it changed, so a refresh does not disturb a selection or repaint. */
export function setText(node, text) {
  const value = text ?? '';
  if (node.textContent !== value) node.textContent = value;
}

export function setTitle(node, title) {
  const value = title ?? '';
  if (node.title !== value) node.title = value;
}

export function toggleClass(node, name, on) {
  if (node.classList.contains(name) !== Boolean(on)) node.classList.toggle(name, Boolean(on));
}

/** Replaces a container's children only when `signature` differs from the last one built. */
export function rebuild(container, signature, build) {
  if (container.dataset.sig === signature) return;
  container.dataset.sig = signature;
  container.replaceChildren(...[build()].flat().filter(Boolean));
}

/** A definition list whose values are updated in place (a selection in it survives the once-a-second tick). */
export function renderKv(list, rows) {
  const labels = rows.map(([label]) => label).join('\n');
  if (list.dataset.labels !== labels) {
    list.dataset.labels = labels;
    list.replaceChildren(...rows.flatMap(([label, , cls]) => [el('dt', {}, label), el('dd', { className: cls ?? '' })]));
  }
  rows.forEach(([, value], i) => setText(list.children[i * 2 + 1], String(value)));
}
