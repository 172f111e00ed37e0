//! [`Partition`]: the shapes of network fault a test cluster can be put in
//! (one node isolated, a minority and a majority, a ring, an asymmetric
//! cut, random loss), and the directed [`LinkFault`]s each shape is made of.
//!
//! A shape only ever touches links between nodes: clients reach every node
//! throughout. Every shape leaves a majority of nodes that reach each other
//! both ways (the ring's leader reaches its two neighbours), so the cluster
//! can make progress while it holds.
//!
//! How a fault is carried out depends on the cluster's network (see
//! [`crate::cluster::TestCluster::disrupt`]): in network namespaces a
//! directed fault `from -> to` acts on IP packets from `from` to `to`
//! ([`crate::netns::Fabric`]); behind TCP proxies it acts on the
//! connections `from` opens to `to` ([`crate::proxy::Proxy`]).

use std::fmt;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// How a cut refuses a node's packets to a peer in network namespaces:
/// which route type, so the node's sockets see each of the errors a real
/// network gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CutRoute {
    /// The sender gets EACCES, as after an "administratively prohibited"
    /// ICMP error.
    Prohibit,
    /// The sender gets EHOSTUNREACH.
    Unreachable,
    /// The packet is discarded (the sender gets EINVAL).
    Blackhole,
}

impl CutRoute {
    /// The route type's name in `ip route`.
    pub fn name(self) -> &'static str {
        match self {
            CutRoute::Prohibit => "prohibit",
            CutRoute::Unreachable => "unreachable",
            CutRoute::Blackhole => "blackhole",
        }
    }
}

/// What happens on one directed link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Nothing goes through.
    Cut(CutRoute),
    /// This percentage of packets (or, behind a proxy, of forwarded chunks,
    /// which then stall as TCP would for a retransmission) is lost.
    Loss(u8),
}

/// A fault on the link from node `from` to node `to`, that direction only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkFault {
    pub from: u64,
    pub to: u64,
    pub fault: Fault,
}

/// Smallest and largest share of packets the loss shape drops, in percent.
pub const LOSS_PERCENT_MIN: u8 = 10;
pub const LOSS_PERCENT_MAX: u8 = 50;

/// How many neighbours on either side each node of an `n`-node ring
/// reaches: the fewest that still give a node a majority with itself.
pub fn ring_reach(n: usize) -> usize {
    let majority = n / 2 + 1;
    (majority - 1).div_ceil(2)
}

/// A network fault over the nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partition {
    /// `node` cut off from every other node, both ways.
    Isolate {
        node: u64,
        others: Vec<u64>,
        route: CutRoute,
    },
    /// A minority cut off from the majority, both ways.
    Halves {
        minority: Vec<u64>,
        majority: Vec<u64>,
        route: CutRoute,
    },
    /// The nodes in a ring, in this order: each reaches only its
    /// neighbours, the [`ring_reach`] nearest on either side (four or more
    /// nodes; one on either side for four or five).
    Ring { order: Vec<u64>, route: CutRoute },
    /// Packets from `from` to `to` are lost; the other way they go
    /// through. One side is a minority.
    Asymmetric {
        from: Vec<u64>,
        to: Vec<u64>,
        route: CutRoute,
    },
    /// `percent` of the packets between `nodes` (a minority) and the rest
    /// are lost, both ways.
    Loss {
        nodes: Vec<u64>,
        others: Vec<u64>,
        percent: u8,
    },
}

impl Partition {
    /// The shape's name in logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Partition::Isolate { .. } => "isolate",
            Partition::Halves { .. } => "halves",
            Partition::Ring { .. } => "ring",
            Partition::Asymmetric { .. } => "asymmetric",
            Partition::Loss { .. } => "loss",
        }
    }

    /// The directed link faults that make up the shape.
    pub fn faults(&self) -> Vec<LinkFault> {
        let both = |a: &[u64], b: &[u64], fault: Fault| {
            let mut out = Vec::new();
            for &x in a {
                for &y in b {
                    out.push(LinkFault {
                        from: x,
                        to: y,
                        fault,
                    });
                    out.push(LinkFault {
                        from: y,
                        to: x,
                        fault,
                    });
                }
            }
            out
        };
        match self {
            Partition::Isolate {
                node,
                others,
                route,
            } => both(&[*node], others, Fault::Cut(*route)),
            Partition::Halves {
                minority,
                majority,
                route,
            } => both(minority, majority, Fault::Cut(*route)),
            Partition::Ring { order, route } => {
                let n = order.len();
                let reach = ring_reach(n);
                let mut out = Vec::new();
                for i in 0..n {
                    for j in 0..n {
                        let gap = (i + n - j) % n;
                        if gap.min(n - gap) > reach {
                            out.push(LinkFault {
                                from: order[i],
                                to: order[j],
                                fault: Fault::Cut(*route),
                            });
                        }
                    }
                }
                out
            }
            Partition::Asymmetric { from, to, route } => from
                .iter()
                .flat_map(|&x| {
                    to.iter().map(move |&y| LinkFault {
                        from: x,
                        to: y,
                        fault: Fault::Cut(*route),
                    })
                })
                .collect(),
            Partition::Loss {
                nodes,
                others,
                percent,
            } => both(nodes, others, Fault::Loss(*percent)),
        }
    }

    /// The fault on the link from `from` to `to`, if any.
    pub fn fault(&self, from: u64, to: u64) -> Option<Fault> {
        self.faults()
            .into_iter()
            .find(|f| f.from == from && f.to == to)
            .map(|f| f.fault)
    }

    /// Whether `node` is cut off from a majority (its leaderships then fail
    /// over); a ring or lossy links leave every node some way through.
    pub fn cuts_off(&self, node: u64) -> bool {
        match self {
            Partition::Isolate { node: n, .. } => *n == node,
            Partition::Halves { minority, .. } => minority.contains(&node),
            Partition::Asymmetric { from, to, .. } => {
                let minority = if from.len() < to.len() { from } else { to };
                minority.contains(&node)
            }
            Partition::Ring { .. } | Partition::Loss { .. } => false,
        }
    }

    /// Picks a shape for nodes `1..=nodes` that involves `target` (the node
    /// the nemesis aims at), from `rng`. The number of draws depends on
    /// `nodes` only, so a seed gives the same schedule whatever the target.
    /// `loss` says whether the loss shape can be carried out.
    pub fn pick(rng: &mut StdRng, nodes: u64, target: u64, loss: bool) -> Partition {
        assert!(nodes >= 3 && (1..=nodes).contains(&target));
        let minority_max = ((nodes - 1) / 2) as usize;
        let kind: usize = rng.gen();
        let size = rng.gen_range(1..=minority_max);
        let route = [
            CutRoute::Prohibit,
            CutRoute::Unreachable,
            CutRoute::Blackhole,
        ][rng.gen_range(0..3)];
        let percent = rng.gen_range(LOSS_PERCENT_MIN..=LOSS_PERCENT_MAX);
        let outward = rng.gen_bool(0.5);
        let mut others: Vec<u64> = (1..=nodes).filter(|n| *n != target).collect();
        others.shuffle(rng);

        let mut shapes = vec!["isolate", "asymmetric"];
        if minority_max >= 2 {
            shapes.push("halves");
        }
        if nodes >= 4 {
            shapes.push("ring");
        }
        if loss {
            shapes.push("loss");
        }
        let sorted = |mut v: Vec<u64>| {
            v.sort_unstable();
            v
        };
        // The minority: `target` and `size - 1` others.
        let side = sorted([vec![target], others[..size - 1].to_vec()].concat());
        let rest = sorted(others[size - 1..].to_vec());
        match shapes[kind % shapes.len()] {
            "isolate" => Partition::Isolate {
                node: target,
                others: sorted(others),
                route,
            },
            "halves" => Partition::Halves {
                // At least two nodes: one alone is `isolate`.
                minority: sorted([vec![target], others[..size.max(2) - 1].to_vec()].concat()),
                majority: sorted(others[size.max(2) - 1..].to_vec()),
                route,
            },
            "ring" => Partition::Ring {
                order: [vec![target], others].concat(),
                route,
            },
            "asymmetric" if outward => Partition::Asymmetric {
                from: side,
                to: rest,
                route,
            },
            "asymmetric" => Partition::Asymmetric {
                from: rest,
                to: side,
                route,
            },
            _ => Partition::Loss {
                nodes: side,
                others: rest,
                percent,
            },
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Partition::Isolate {
                node,
                others,
                route,
            } => write!(f, "isolate [{node}] | {others:?} ({})", route.name()),
            Partition::Halves {
                minority,
                majority,
                route,
            } => write!(f, "halves {minority:?} | {majority:?} ({})", route.name()),
            Partition::Ring { order, route } => write!(
                f,
                "ring {order:?}, each reaching {} neighbour(s) either side ({})",
                ring_reach(order.len()),
                route.name()
            ),
            Partition::Asymmetric { from, to, route } => {
                write!(f, "asymmetric {from:?} -> {to:?} lost ({})", route.name())
            }
            Partition::Loss {
                nodes,
                others,
                percent,
            } => write!(f, "loss {percent}% between {nodes:?} and {others:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Nodes that reach each other both ways under `p`, from `start`.
    fn connected_component(p: &Partition, nodes: u64, start: u64) -> Vec<u64> {
        let mut seen = vec![start];
        let mut i = 0;
        while i < seen.len() {
            let x = seen[i];
            for y in 1..=nodes {
                if !seen.contains(&y) && p.fault(x, y).is_none() && p.fault(y, x).is_none() {
                    seen.push(y);
                }
            }
            i += 1;
        }
        seen
    }

    #[test]
    fn every_shape_leaves_a_majority_that_reaches_itself() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut names = std::collections::BTreeSet::new();
        for nodes in [3u64, 4, 5, 6, 7] {
            for target in 1..=nodes {
                for _ in 0..50 {
                    let p = Partition::pick(&mut rng, nodes, target, true);
                    names.insert(p.name());
                    let faults = p.faults();
                    assert!(!faults.is_empty(), "{p}");
                    assert!(faults.iter().all(|f| f.from != f.to
                        && (1..=nodes).contains(&f.from)
                        && (1..=nodes).contains(&f.to)));
                    // Some node has a majority (itself included) that it
                    // reaches directly both ways: a leader there can commit.
                    let majority = (nodes / 2 + 1) as usize;
                    let has_quorum = (1..=nodes).any(|x| {
                        1 + (1..=nodes)
                            .filter(|&y| {
                                y != x && p.fault(x, y).is_none() && p.fault(y, x).is_none()
                            })
                            .count()
                            >= majority
                    });
                    assert!(has_quorum, "{nodes} nodes: {p}");
                    // The target is always involved.
                    assert!(
                        faults.iter().any(|f| f.from == target || f.to == target),
                        "{p}"
                    );
                    if p.cuts_off(target) {
                        assert!(
                            connected_component(&p, nodes, target).len() < majority,
                            "{p}"
                        );
                    }
                }
            }
        }
        assert_eq!(names.len(), 5, "every shape came up: {names:?}");
    }

    #[test]
    fn shapes_cut_what_they_say() {
        let route = CutRoute::Prohibit;
        let ring = Partition::Ring {
            order: vec![1, 2, 3, 4, 5],
            route,
        };
        // Neighbours reach each other; the rest do not, either way.
        for (a, b, cut) in [
            (1, 2, false),
            (1, 5, false),
            (1, 3, true),
            (2, 4, true),
            (3, 5, true),
        ] {
            assert_eq!(ring.fault(a, b).is_some(), cut, "{a}->{b}");
            assert_eq!(ring.fault(b, a).is_some(), cut, "{b}->{a}");
        }
        let asym = Partition::Asymmetric {
            from: vec![1],
            to: vec![2, 3],
            route,
        };
        assert!(asym.fault(1, 2).is_some() && asym.fault(2, 1).is_none());
        assert!(asym.fault(2, 3).is_none());
        let loss = Partition::Loss {
            nodes: vec![2],
            others: vec![1, 3],
            percent: 30,
        };
        assert_eq!(loss.fault(2, 1), Some(Fault::Loss(30)));
        assert_eq!(loss.fault(3, 2), Some(Fault::Loss(30)));
        assert_eq!(loss.fault(1, 3), None);
    }

    #[test]
    fn without_loss_the_loss_shape_never_comes_up() {
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..500 {
            assert_ne!(Partition::pick(&mut rng, 5, 2, false).name(), "loss");
        }
    }
}
