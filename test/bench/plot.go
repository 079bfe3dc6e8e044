package main

import (
	"fmt"
	"image/color"
	"math"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// series is one line of the plot: a method's medians per size.
type series struct {
	name string
	pts  plotter.XYs
	dash bool
}

// plotSeries collects one series per method (livesentry: blackout and
// time to data per mode and folio size) from the measured rows.
func (r *Results) plotSeries() []*series {
	var out []*series
	get := func(name string, dash bool) *series {
		for _, s := range out {
			if s.name == name {
				return s
			}
		}
		s := &series{name: name, dash: dash}
		out = append(out, s)
		return s
	}
	add := func(s *series, size uint64, d float64) {
		// A log axis cannot show 0; nothing measured here is below 1 µs.
		s.pts = append(s.pts, plotter.XY{X: float64(size >> 20), Y: math.Max(d/1e6, 1e-3)})
	}
	for _, row := range r.Rows {
		if row.Skipped != "" || len(row.Pause) == 0 || row.IdleGap > 0 {
			continue
		}
		switch row.Method {
		case methodTransfer, methodExec:
			add(get(row.Name()+": blackout", false), row.Size, float64(row.Pause.Median()))
			if row.Method == methodTransfer {
				add(get(row.Name()+": time to data", true), row.Size, float64(row.Data.Median()))
			}
		case methodCopyFloor:
			add(get(row.Name(), true), row.Size, float64(row.Pause.Median()))
		default:
			add(get(row.Name()+": app pause", false), row.Size, float64(row.Pause.Median()))
		}
	}
	return out
}

// WritePlot draws time against size, both log scale, one line per
// method, into a PNG (or any format gonum/plot knows by path's
// extension).
func (r *Results) WritePlot(path string) error {
	p := plot.New()
	p.Title.Text = "Restart cost vs preserved memory (medians)"
	p.X.Label.Text = "preserved memory (MiB)"
	p.Y.Label.Text = "time (ms)"
	p.X.Scale = plot.LogScale{}
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	var ticks []plot.Tick
	for _, s := range r.sizes() {
		ticks = append(ticks, plot.Tick{Value: float64(s >> 20), Label: sizeLabel(s)})
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.TextStyle.Font.Size = vg.Points(8)
	all := r.plotSeries()
	if len(all) == 0 {
		return fmt.Errorf("nothing measured to plot")
	}
	for i, s := range all {
		l, pts, err := plotter.NewLinePoints(s.pts)
		if err != nil {
			return err
		}
		c := palette[i%len(palette)]
		l.Color, pts.Color = c, c
		l.Width = vg.Points(1.5)
		if s.dash {
			l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
		}
		pts.Shape = plotutil.Shape(i)
		pts.Radius = vg.Points(3)
		p.Add(l, pts)
		p.Legend.Add(s.name, legendThumb{l, pts})
	}
	// Room above the highest point for the legend.
	p.Y.Max *= 30
	return p.Save(10*vg.Inch, 7*vg.Inch, path)
}

// palette has a distinct colour for each of the ten series.
var palette = []color.Color{
	color.RGBA{0x1f, 0x77, 0xb4, 0xff}, color.RGBA{0xff, 0x7f, 0x0e, 0xff}, color.RGBA{0x2c, 0xa0, 0x2c, 0xff},
	color.RGBA{0xd6, 0x27, 0x28, 0xff}, color.RGBA{0x94, 0x67, 0xbd, 0xff}, color.RGBA{0x8c, 0x56, 0x4b, 0xff},
	color.RGBA{0xe3, 0x77, 0xc2, 0xff}, color.RGBA{0x7f, 0x7f, 0x7f, 0xff}, color.RGBA{0xbc, 0xbd, 0x22, 0xff},
	color.RGBA{0x17, 0xbe, 0xcf, 0xff},
}

// legendThumb draws a series' line and marker in the legend.
type legendThumb struct {
	l   *plotter.Line
	pts *plotter.Scatter
}

func (t legendThumb) Thumbnail(c *draw.Canvas) {
	t.l.Thumbnail(c)
	t.pts.Thumbnail(c)
}
