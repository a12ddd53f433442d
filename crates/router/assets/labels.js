// The node's labels in the detail view: the edit form for administrators, a read-only list for viewers.

import { $, renderKv, setText, toggleClass } from './dom.js';
import { api, ApiError, Unreachable } from './api.js';
import { detailNode, isAdmin } from './state.js';
import { showSignin } from './session.js';
import { applyNode } from './actions.js';

// The edit form is taken out of the page for viewers (not merely hidden), so it is held here.
export const editForm = $('edit-form');
const editName = $('edit-display-name');
const editNotes = $('edit-notes');
const editTags = $('edit-tags');
const editSave = $('edit-save');
const editReset = $('edit-reset');
export const editStatus = $('edit-status');
export const editHome = $('detail-labels');

// The edit form. An edit in progress is never overwritten by a refresh: the form is refilled from the router only
// while what it shows is still what the router last said (not dirty), and always when another node is opened.

function labelsOf(node) {
  return { display_name: node.display_name ?? '', notes: node.notes ?? '', tags: node.tags.join(', ') };
}

function formValues() {
  return { display_name: editName.value, notes: editNotes.value, tags: editTags.value };
}

function formDirty() {
  const form = editForm;
  return form.dataset.base !== undefined && form.dataset.base !== JSON.stringify(formValues());
}

function fillForm(node) {
  const values = labelsOf(node);
  const form = editForm;
  form.dataset.base = JSON.stringify(values);
  form.dataset.node = node.id;
  for (const [field, input] of [['display_name', editName], ['notes', editNotes], ['tags', editTags]]) {
    if (input.value !== values[field]) input.value = values[field];
  }
  updateFormState();
}

function updateFormState() {
  const dirty = formDirty();
  editSave.disabled = !dirty;
  editReset.hidden = !dirty;
  const status = editStatus;
  if (dirty) setText(status, 'Unsaved changes');
  else if (status.dataset.kind !== 'saved') setText(status, '');
  toggleClass(status, 'is-dirty', dirty);
}

export function renderLabels(node) {
  const form = editForm;
  const labels = $('detail-labels');
  form.hidden = !isAdmin();
  labels.hidden = isAdmin();
  if (isAdmin()) {
    if (form.dataset.node !== node.id || !formDirty()) fillForm(node);
    return;
  }
  const rows = [
    ['Display name', node.display_name || '–'],
    ['Notes', node.notes || '–'],
    ['Tags', node.tags.join(', ') || '–'],
  ];
  renderKv(labels, rows.map(([label, value]) => [label, value, 'prewrap']));
}

editForm.addEventListener('input', () => {
  delete editStatus.dataset.kind;
  updateFormState();
});

editReset.addEventListener('click', () => {
  const node = detailNode();
  if (node) fillForm(node);
});

editForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const id = editForm.dataset.node;
  if (!id || !formDirty()) return;
  const values = formValues();
  const body = {
    display_name: values.display_name.trim(),
    notes: values.notes.trim(),
    tags: values.tags.split(',').map((t) => t.trim()).filter(Boolean),
  };
  const save = editSave;
  const status = editStatus;
  save.disabled = true;
  setText(status, 'Saving…');
  try {
    const updated = await api('PATCH', `/v0/nodes/${encodeURIComponent(id)}`, body);
    fillForm(updated);
    status.dataset.kind = 'saved';
    setText(status, 'Saved');
    applyNode(updated);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showSignin('Your session has ended; sign in again.');
      return;
    }
    setText(status, err instanceof Unreachable ? 'Not saved: the router cannot be reached.' : `Not saved: ${err.message}`);
    save.disabled = false;
  }
});
