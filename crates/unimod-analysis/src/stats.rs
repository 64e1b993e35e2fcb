//! Means with their standard errors, and the 95 % intervals every verdict of this project is
//! drawn from.
//!
//! A standard error estimated from few repeats is itself noisy: with three seeds, "two standard
//! errors" is an 82 % interval, not a 95 % one. An [`Estimate`] therefore carries the degrees of
//! freedom its error rests on, and its interval uses Student's t at that many (4.30 at two,
//! 2.78 at four, 1.96 with an error known from theory, such as the binomial error of the
//! samples scored).
//!
//! ```
//! use unimod_analysis::stats::Estimate;
//!
//! // Three seeds of two variants sharing their seeds (same data order, same evaluation set).
//! let (a, b) = ([0.49, 0.62, 0.69], [0.58, 0.45, 0.59]);
//! let d = Estimate::paired(&a, &b);
//! assert_eq!(d.df, 2.0);
//! assert!((d.critical() - 4.303).abs() < 1e-3);
//! assert!(!d.shown()); // −6 points with a ±33-point interval
//! ```

/// A mean with its standard error and the degrees of freedom the error was estimated with
/// (`f64::INFINITY` for an error known from theory or from very many samples).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The mean (or mean difference).
    pub mean: f64,
    /// Its standard error; NaN when nothing estimates it.
    pub se: f64,
    /// Degrees of freedom of `se`.
    pub df: f64,
}

impl Estimate {
    /// The mean of independent samples `v`, with the standard error `sd / √n` on `n − 1`
    /// degrees of freedom (NaN error with fewer than two samples; NaN mean with none).
    pub fn mean_of(v: &[f64]) -> Estimate {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Estimate {
            mean,
            se: if v.len() < 2 {
                f64::NAN
            } else {
                (var / n).sqrt()
            },
            df: n - 1.0,
        }
    }

    /// A mean whose standard error is known (from theory, or over so many samples that its
    /// own noise does not matter): the normal interval.
    pub fn known(mean: f64, se: f64) -> Estimate {
        Estimate {
            mean,
            se,
            df: f64::INFINITY,
        }
    }

    /// The mean of `b − a` over matched pairs (the same seed of two variants, the same sample
    /// under two conditions): a paired comparison, on `n − 1` degrees of freedom. Pairing
    /// removes what the pair shares (data order, evaluation set), which unpaired errors count
    /// twice.
    pub fn paired(a: &[f64], b: &[f64]) -> Estimate {
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
        Estimate::mean_of(&d)
    }

    /// `self − other` for independent estimates, with Welch–Satterthwaite degrees of freedom.
    pub fn minus(self, other: Estimate) -> Estimate {
        let (va, vb) = (self.se * self.se, other.se * other.se);
        let df = (va + vb).powi(2) / (va * va / self.df + vb * vb / other.df);
        Estimate {
            mean: self.mean - other.mean,
            se: (va + vb).sqrt(),
            // Two errors of zero leave the degrees of freedom undefined; either bound holds.
            df: if df.is_nan() {
                self.df.min(other.df)
            } else {
                df
            },
        }
    }

    /// This estimate with its standard error raised to `floor` where that is larger (or where
    /// it has none): a floor known from theory, such as the binomial error of the samples
    /// scored, so the interval is then the normal one. This keeps a comparison of few seeds
    /// that happen to agree from claiming more than the evaluation can resolve.
    pub fn at_least(self, floor: f64) -> Estimate {
        // A floor of zero (a loss has no binomial error) leaves a missing error missing.
        if self.se >= floor || floor.is_nan() || floor <= 0.0 {
            self
        } else {
            Estimate::known(self.mean, floor)
        }
    }

    /// The two-sided 95 % critical value of Student's t at this estimate's degrees of freedom.
    pub fn critical(&self) -> f64 {
        t_975(self.df)
    }

    /// Half the width of the 95 % interval around the mean (NaN when there is no error).
    pub fn half_width(&self) -> f64 {
        self.critical() * self.se
    }

    /// Whether the mean lies outside its 95 % interval around zero (false without an error).
    pub fn shown(&self) -> bool {
        self.mean.abs() > self.half_width()
    }

    /// The two-sided p-value of a zero mean: the chance of a mean at least this far from zero
    /// were the true one zero (Student's t at `df`, the normal beyond; NaN without an error).
    /// Below 0.05 exactly when [`Estimate::shown`], up to the rounding of the tabulated
    /// critical values; what [`holm`] reads when many comparisons are made at once.
    pub fn p_value(&self) -> f64 {
        let t = (self.mean / self.se).abs();
        if t.is_nan() || self.df.is_nan() || self.df < 1.0 {
            f64::NAN
        } else if self.df.is_infinite() {
            erfc(t / std::f64::consts::SQRT_2)
        } else {
            // P(|T| > t) = I_{df / (df + t²)}(df / 2, 1 / 2).
            incomplete_beta(self.df / 2.0, 0.5, self.df / (self.df + t * t))
        }
    }
}

/// Holm's step-down correction: which of the comparisons with two-sided p-values `p` are
/// *shown* with a 5 % chance that any of them is shown by chance alone (where 95 % intervals
/// read one by one would show one in twenty true nulls). A NaN p-value (no error to test
/// against) is not shown and does not count among the comparisons.
pub fn holm(p: &[f64]) -> Vec<bool> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = order.len();
    let mut shown = vec![false; p.len()];
    for (k, &i) in order.iter().enumerate() {
        if p[i] > 0.05 / (m - k) as f64 {
            break;
        }
        shown[i] = true;
    }
    shown
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, nine terms: relative error below 1e-13).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G[0] + (1..9).map(|i| G[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularised incomplete beta function `I_x(a, b)`, by its continued fraction (modified
/// Lentz), taken on the side of `x` where it converges fast.
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    let tiny = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = 1.0 / if d.abs() < tiny { tiny } else { d };
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        for coefficient in [even, odd] {
            d = 1.0 + coefficient * d;
            d = 1.0 / if d.abs() < tiny { tiny } else { d };
            c = 1.0 + coefficient / c;
            if c.abs() < tiny {
                c = tiny;
            }
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The complementary error function (Chebyshev fit: relative error below 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Two-sided 95 % critical values of Student's t at 1 to 30 degrees of freedom.
const T_975: [f64; 30] = [
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
    2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687,
    2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
];

/// The normal distribution's 97.5 % quantile.
const Z_975: f64 = 1.959_963_984_540_054;

/// The 97.5 % quantile of Student's t with `df` degrees of freedom: the tabulated value up to
/// 30 (fractional degrees, from Welch, round down, which widens the interval), Cornish–Fisher's
/// expansion beyond (within 1e-4 there), NaN below one degree.
pub fn t_975(df: f64) -> f64 {
    if df.is_nan() || df < 1.0 {
        f64::NAN
    } else if df <= 30.0 {
        T_975[df.floor() as usize - 1]
    } else {
        let z = Z_975;
        let z3 = z.powi(3);
        let z5 = z.powi(5);
        z + (z3 + z) / (4.0 * df)
            + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * df * df)
            + (3.0 * z.powi(7) + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * df.powi(3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P(|T| < t) for Student's t with `df` degrees of freedom, by Simpson's rule after
    /// t = √df·tan θ, under which the density is proportional to cos^(df−1) θ on [0, π/2).
    fn t_mass_to(t: f64, df: f64) -> f64 {
        let integral = |to: f64| {
            let n = 20_000;
            let h = to / n as f64;
            let f = |x: f64| x.cos().powf(df - 1.0);
            (0..=n)
                .map(|i| {
                    let w = if i == 0 || i == n {
                        1.0
                    } else if i % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    };
                    w * f(i as f64 * h)
                })
                .sum::<f64>()
                * h
                / 3.0
        };
        integral((t / df.sqrt()).atan()) / integral(std::f64::consts::FRAC_PI_2)
    }

    #[test]
    fn critical_values_leave_two_and_a_half_percent_in_each_tail() {
        for df in [1.0, 2.0, 3.0, 4.0, 7.0, 12.0, 30.0, 31.0, 45.0, 200.0] {
            let mass = t_mass_to(t_975(df), df);
            assert!((mass - 0.95).abs() < 2e-5, "df {df}: {mass}");
        }
        // Closed forms at one and two degrees of freedom, and the normal limit.
        assert!((t_975(1.0) - (0.475 * std::f64::consts::PI).tan()).abs() < 1e-4);
        assert!((t_975(2.0) - 0.95 / (2.0f64 * 0.975 * 0.025).sqrt()).abs() < 1e-4);
        assert!((t_975(1e9) - 1.95996).abs() < 1e-5);
        assert!(t_975(0.5).is_nan() && t_975(f64::NAN).is_nan());
        // Fractional degrees round down: never a narrower interval than the data allow.
        assert_eq!(t_975(2.9), t_975(2.0));
    }

    #[test]
    fn p_values_leave_their_mass_in_the_tails() {
        let p = |t: f64, df: f64| {
            Estimate {
                mean: t,
                se: 1.0,
                df,
            }
            .p_value()
        };
        // At the 95 % critical value, 5 % lies beyond: `p_value` and `shown` agree.
        for df in [1.0, 2.0, 3.0, 5.0, 9.0, 19.0, 30.0, 45.0, 200.0] {
            assert!(
                (p(t_975(df), df) - 0.05).abs() < 2e-5,
                "df {df}: {}",
                p(t_975(df), df)
            );
        }
        assert!((p(Z_975, f64::INFINITY) - 0.05).abs() < 1e-7);
        // Against direct integration of the density, away from the critical value too.
        for (t, df) in [(0.3, 2.0), (1.0, 4.0), (2.2, 7.0), (4.0, 3.0), (0.8, 15.0)] {
            let direct = 1.0 - t_mass_to(t, df);
            assert!((p(t, df) - direct).abs() < 1e-6, "t {t} df {df}");
        }
        // Closed form at one degree of freedom (Cauchy), the sign, and no error.
        assert!((p(1.0, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(p(-2.0, 6.0), p(2.0, 6.0));
        assert!(p(0.0, 4.0) == 1.0 && Estimate::mean_of(&[0.3]).p_value().is_nan());
    }

    #[test]
    fn holm_steps_down_from_the_smallest_p() {
        // m = 4: 0.01 ≤ 0.05/4, 0.015 ≤ 0.05/3, 0.03 > 0.05/2 stops it, 0.04 is not reached.
        assert_eq!(holm(&[0.04, 0.01, 0.03, 0.015]), [false, true, false, true]);
        // Read one at a time all four would be shown; all four pass when all are small.
        assert_eq!(holm(&[0.001, 0.002, 0.003, 0.004]), [true; 4]);
        // A NaN is neither shown nor counted: with it, m is 1 and 0.04 stands alone.
        assert_eq!(holm(&[f64::NAN, 0.04]), [false, true]);
        assert!(holm(&[]).is_empty());
    }

    #[test]
    fn pairing_removes_what_the_pairs_share() {
        // Each seed shifts both variants alike; b is 0.01 above a in every pair.
        let a = [0.90, 0.95, 0.97];
        let b = [0.91, 0.96, 0.98];
        let paired = Estimate::paired(&a, &b);
        assert!((paired.mean - 0.01).abs() < 1e-12 && paired.se < 1e-12);
        assert!(paired.shown());
        let unpaired = Estimate::mean_of(&b).minus(Estimate::mean_of(&a));
        assert!((unpaired.mean - 0.01).abs() < 1e-12);
        assert!(!unpaired.shown(), "{unpaired:?}");
        // Welch with equal spreads and sizes: 2(n − 1) degrees of freedom.
        assert!((unpaired.df - 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_floor_keeps_agreeing_seeds_honest() {
        let d = Estimate::paired(&[0.5, 0.5], &[0.52, 0.52]).at_least(0.02);
        assert_eq!((d.se, d.df), (0.02, f64::INFINITY));
        assert!(!d.shown(), "0.02 against a 0.039 half-width");
        // One seed has no spread: the floor alone decides.
        let one = Estimate::mean_of(&[0.3]);
        assert!(one.se.is_nan() && !one.shown());
        assert_eq!(one.at_least(0.01).se, 0.01);
        assert!(one.at_least(0.0).se.is_nan(), "no floor gives no error");
        // A larger error of its own is kept with its degrees of freedom.
        let wide = Estimate::mean_of(&[0.0, 1.0, 2.0]).at_least(0.01);
        assert_eq!((wide.se, wide.df), ((1.0f64 / 3.0).sqrt(), 2.0));
    }
}
