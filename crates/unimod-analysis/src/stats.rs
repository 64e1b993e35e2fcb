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
