// Formatting of figures, times and node fields for display.

import { serverNow } from './api.js';

export function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = value >= 100 || Number.isInteger(value) ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** `474 / 640 GiB`: both figures in the unit of the total. */
export function formatUsage(used, total) {
  const [value, unit] = formatBytes(total).split(' ');
  const scale = Number(total) / Number(value);
  const usedValue = Number(used) / scale;
  const digits = usedValue >= 100 || Number.isInteger(usedValue) || usedValue === 0 ? 0 : 1;
  return `${usedValue.toFixed(digits)} / ${value} ${unit}`;
}

/** The table shows `H100 80GB HBM3`: the vendor prefix repeats on every row; the detail view keeps it. */
export function shortModel(model) {
  return model.replace(/^NVIDIA\s+/i, '');
}

export function formatPercent(value) {
  return value === null || value === undefined ? '–' : `${Math.round(value)}%`;
}

export function formatAgo(iso) {
  if (!iso) return 'never';
  const seconds = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
  if (seconds < 3) return 'just now';
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

export function formatTime(iso) {
  return iso ? dateFormat.format(new Date(iso)) : '';
}

export function nodeName(node) {
  return node.display_name || node.machine_name;
}

export function address(node) {
  return node.ip_address.includes(':') ? `[${node.ip_address}]:${node.runtime_port}` : `${node.ip_address}:${node.runtime_port}`;
}

function gpuCount(node) {
  return node.gpu_devices.reduce((sum, device) => sum + device.count, 0);
}

/** The fleet-table summary of a node's heartbeat GPUs: mean utilisation and memory used / total. */
export function gpuFigures(node) {
  const gpus = node.metrics?.gpus ?? [];
  const utils = gpus.map((g) => g.utilization).filter((u) => typeof u === 'number');
  const used = gpus.reduce((sum, g) => sum + (g.memory_used_bytes ?? 0), 0);
  const total = gpus.reduce((sum, g) => sum + (g.memory_total_bytes ?? 0), 0);
  return {
    util: utils.length ? utils.reduce((a, b) => a + b, 0) / utils.length : null,
    memory: total > 0 ? formatUsage(used, total) : '',
  };
}

const counts = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const rates = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });

/** `45,000`: a count, grouped as the browser's language groups digits. */
export function formatCount(n) {
  return n === null || n === undefined ? '–' : counts.format(n);
}

/** `0.0417`, `3.2`, `1,250`: a rate, three significant digits below a hundred. */
export function formatRate(value) {
  if (value === null || value === undefined) return '–';
  return value >= 100 ? counts.format(value) : rates.format(value);
}

export function formatMs(ms) {
  return ms === null || ms === undefined ? '–' : `${counts.format(ms)} ms`;
}
