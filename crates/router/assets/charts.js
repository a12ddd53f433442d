// Time-series charts, drawn by uPlot (uplot.esm.js and uplot.min.css, vendored unmodified: docs/dashboard.md says
// which version and where from). A chart keeps one uPlot instance and hands it the new figures on each refresh; it
// is built again only when its series change (another grouping, another top 8). It is drawn once its box has a
// width (a page that is hidden has none) and follows the box's width afterwards.
//
// uPlot draws on canvases and sets the few styles it needs through the CSSOM (element.style), which the page's
// `style-src 'self'` policy allows; series names reach its legend as text.

import uPlot from './uplot.esm.js';

/** Colours of the series of a split (by key, model or node), in order; `other` is the rest together. */
export const PALETTE = ['#3b5bdb', '#12b76a', '#f79009', '#7a5af8', '#15aabf', '#ee46bc', '#a16207', '#f04438'];
export const COLORS = {
  requests: '#3b5bdb',
  errors: '#f04438',
  rejected: '#f79009',
  prompt: '#3b5bdb',
  completion: '#15aabf',
  p50: '#12b76a',
  p99: '#7a5af8',
  other: '#98a2b3',
};

const compact = new Intl.NumberFormat(undefined, { notation: 'compact', maximumFractionDigits: 1 });
const whole = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const rate = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });

/** Steps between the ticks of a count: whole numbers only. */
const COUNT_STEPS = [];
for (let power = 1; power <= 1e12; power *= 10) COUNT_STEPS.push(power, power * 2, power * 5);

const charts = new Map();
const resized = new ResizeObserver((entries) => {
  for (const entry of entries) charts.get(entry.target)?.fit();
});

function cssVar(node, name, fallback) {
  return getComputedStyle(node).getPropertyValue(name).trim() || fallback;
}

export class TimeChart {
  /**
   * @param {HTMLElement} box where the chart goes; its width is the chart's.
   * @param {object} options `height` in CSS pixels; `counts`: the figures are whole numbers; `stamp(seconds)`: a
   *   bucket's time as the legend shows it while the pointer is over the chart; `rest`: the legend's first cell
   *   when it is not (the series then show their `legend` text, a total or the latest figure).
   */
  constructor(box, { height = 180, counts = true, stamp, rest = 'Total' }) {
    this.box = box;
    this.options = { height, counts, stamp, rest };
    this.plot = null;
    this.shape = '';
    this.figures = null;
    this.stale = false;
    this.legends = [];
    charts.set(box, this);
    resized.observe(box);
  }

  /** New figures: `xs` in seconds, `series` [{label, color, values, legend, fill, gaps}], each value per x (null:
   * none in that bucket, drawn as a gap). */
  update(xs, series) {
    this.figures = { xs, series };
    this.stale = true;
    this.draw();
  }

  /** Draws the latest figures, once the box has a width. */
  draw() {
    const width = this.box.clientWidth;
    if (!this.stale || width === 0) return;
    this.stale = false;
    const { xs, series } = this.figures;
    this.legends = series.map((s) => s.legend);
    const data = [xs, ...series.map((s) => s.values)];
    const shape = JSON.stringify(series.map((s) => [s.label, s.color, Boolean(s.fill), Boolean(s.gaps)]));
    if (this.plot && shape === this.shape) {
      if (this.plot.width !== width) this.plot.setSize({ width, height: this.options.height });
      this.plot.setData(data);
      // The legend shows each series' total (or latest figure) while the pointer is not over the chart.
      this.plot.setLegend();
    } else {
      this.plot?.destroy();
      this.shape = shape;
      this.plot = new uPlot(this.config(series, width), data, this.box);
    }
  }

  /** Follows the box's width; draws what waited for one. */
  fit() {
    const width = this.box.clientWidth;
    if (width === 0) return;
    if (this.stale) this.draw();
    else if (this.plot && this.plot.width !== width) this.plot.setSize({ width, height: this.options.height });
  }

  config(series, width) {
    const { height, counts, rest } = this.options;
    const text = cssVar(this.box, '--muted', '#667085');
    const line = cssVar(this.box, '--border', '#e4e7ec');
    const font = `11px ${getComputedStyle(document.body).fontFamily}`;
    const axis = { stroke: text, font, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1, size: 4 } };
    const figures = counts ? whole : rate;
    const format = (value) => (value === null || value === undefined ? '–' : figures.format(value));
    return {
      width,
      height,
      class: 'chart-plot',
      cursor: { drag: { x: false, y: false, setScale: false } },
      scales: {
        x: { time: true },
        // From zero, with some room above the highest figure; an empty period still shows an axis.
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
      },
      axes: [
        axis,
        { ...axis, size: 46, incrs: counts ? COUNT_STEPS : undefined, values: (u, ticks) => ticks.map((v) => compact.format(v)) },
      ],
      series: [
        // No name for the time (uPlot would write "Time"): the legend starts with the bucket's time, or `rest`.
        { label: document.createElement('span'), value: (u, value, seriesIdx, dataIdx) => (dataIdx === null || dataIdx === undefined ? rest : this.options.stamp(value)) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color,
          width: 1.5,
          fill: s.fill ? `${s.color}1f` : undefined,
          // A series with gaps (no figure in some buckets) shows its points: a lone figure has no line to draw.
          points: s.gaps ? { show: true, size: 5 } : undefined,
          value: (u, value, seriesIdx, dataIdx) => (dataIdx === null || dataIdx === undefined ? this.legends[i] ?? '' : format(value)),
        })),
      ],
    };
  }
}
